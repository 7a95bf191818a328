# Sourced by tpu_pod.sh and gke/launch.sh: the run's fit on the slice, checked on this machine
# before a pod is created or a workload submitted (`python -m experiments.doctor --target=...`,
# the run config and its overrides; see launch/README.md). Reads FIT_CHECK (compile, analytic
# or off), TYPE, SLICES, CONFIG, EXTRA and PYTHON, and the caller's `run` and `die`. Its table,
# or under --dry-run its command, goes to stderr.
# fit_check REPO_ROOT WHAT   (WHAT: "created" or "submitted", for the refusal message)
fit_check() {
  [[ "$FIT_CHECK" =~ ^(compile|analytic|off)$ ]] || die "--fit-check=$FIT_CHECK: use compile, analytic or off"
  [[ "$FIT_CHECK" == off ]] && return 0
  local target="tpu-$TYPE" cmd
  [[ "$SLICES" != 1 ]] && target="${SLICES}xtpu-$TYPE"
  cmd=("${PYTHON:-python3}" -m experiments.doctor --target="$target"
       --config=experiments/configs/pretrain.py:"$CONFIG")
  [[ "$SLICES" != 1 ]] && cmd+=(--config.mesh.dcn_data=-1)
  [[ "$FIT_CHECK" == analytic ]] && cmd+=(--analytic)
  cmd+=("${EXTRA[@]}")
  (cd "$1" && run "${cmd[@]}" >&2) \
    || die "config $CONFIG does not fit on $TYPE (the fit row above says why and what to change); nothing was $2. --fit-check=off skips this check"
}
