#!/usr/bin/env bash
# Kept for old instructions: every GPU benchmark is now one timed script, h200.sh (8 minutes at
# most, results and log under $OUT). Arguments pass through (e.g. --smoke for the CPU rehearsal).
exec "$(dirname "$0")/h200.sh" "$@"
