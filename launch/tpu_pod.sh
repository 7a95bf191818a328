#!/usr/bin/env bash
# Cloud TPU VM pods: create (queued resources), set up, run the same command on every worker,
# stream logs, tear down. Single slice or multi-slice (--slices=N: DCN between slices).
#
#   launch/tpu_pod.sh create   --name=v3 --zone=us-east5-a --type=v5p-1024 [--slices=2] [--spot]
#   launch/tpu_pod.sh setup    --name=v3 --zone=us-east5-a --bucket=gs://BUCKET/runs [--repo=URL]
#   launch/tpu_pod.sh run      --name=v3 --zone=us-east5-a --bucket=gs://BUCKET/runs \
#                              --config=v3-671b --run=v3-001 [-- --config.train.steps=1000 ...]
#   launch/tpu_pod.sh logs     --name=v3 --zone=us-east5-a --run=v3-001 [--worker=0]
#   launch/tpu_pod.sh delete   --name=v3 --zone=us-east5-a
#
# Every subcommand takes --dry-run: it prints the gcloud commands instead of running them.
# --project=ID is passed to gcloud when given (otherwise gcloud's configured project is used).
#
# How the pieces fit:
#   * create: `gcloud compute tpus queued-resources create`, with --node-count for multi-slice
#     (nodes NAME-0 … NAME-{N-1}; the TPU runtime sets the MEGASCALE_* variables on them).
#   * setup: on every worker of every slice, clones the repository, installs the README's
#     environment (python3.12 venv, requirements-dev.txt, `pip install -e .[tpu]`), installs
#     gcsfuse and mounts the bucket at /mnt/run (checkpoints are plain paths to the trainer,
#     Orbax writes them to the bucket through the mount).
#   * run: the same command on all workers (`--worker=all`), in the background under nohup so
#     that it survives the ssh session; output goes to /mnt/run/RUN/logs/<host>.log.
#     `jax.distributed.initialize()` (called by the entrypoint through
#     `parallel.maybe_initialize_distributed`) auto-detects the TPU pod and the slices; with
#     several slices the mesh puts `dcn_data` across them (mesh.dcn_data = -1 = one per slice).
#   * logs: follows worker 0's log (or --worker=K) of one slice.
#   * delete: deletes the queued resource and its nodes.
set -euo pipefail

ACTION="${1:-}"; shift || true
NAME="" ZONE="" TYPE="v5p-1024" SLICES=1 PROJECT="" RUNTIME="" SPOT=0
BUCKET="" REPO="https://github.com/OWNER/deepseek_jax.git" BRANCH="main" CONFIG="v3-671b"
RUN="" WORKER=0 DRY_RUN=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --slices=*) SLICES="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --runtime=*) RUNTIME="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --branch=*) BRANCH="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --run=*) RUN="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "error: $*" >&2; exit 2; }
need() { for v in "$@"; do [[ -n "${!v}" ]] || die "--$(echo "$v" | tr 'A-Z' 'a-z')=... is required for '$ACTION'"; done; }
# Prints a command (shell-quoted) under --dry-run, runs it otherwise.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
PROJECT_FLAG=(); [[ -n "$PROJECT" ]] && PROJECT_FLAG=(--project="$PROJECT")

# Node names: NAME for one slice, NAME-0 … NAME-{N-1} for several.
nodes() {
  if [[ "$SLICES" == 1 ]]; then echo "$NAME"; else for ((i = 0; i < SLICES; i++)); do echo "$NAME-$i"; done; fi
}
ssh_all() {   # ssh_all COMMAND: the same command on every worker of every slice
  local node
  for node in $(nodes); do
    run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
      --command="$1"
  done
}

case "$ACTION" in
  create)
    need NAME ZONE
    [[ "$TYPE" =~ ^v(5p|5litepod|6e)-[0-9]+$ ]] || die "--type=$TYPE: use an accelerator type like v5p-1024, v5litepod-256, v6e-64"
    # Runtime images per generation (cloud.google.com/tpu/docs/runtimes); --runtime overrides.
    if [[ -z "$RUNTIME" ]]; then
      case "$TYPE" in v5p-*) RUNTIME="v2-alpha-tpuv5" ;; v5litepod-*) RUNTIME="v2-alpha-tpuv5-lite" ;; v6e-*) RUNTIME="v2-alpha-tpuv6e" ;; esac
    fi
    SLICE_FLAGS=(--node-id="$NAME"); [[ "$SLICES" != 1 ]] && SLICE_FLAGS=(--node-count="$SLICES" --node-prefix="$NAME")
    SPOT_FLAG=(); [[ "$SPOT" == 1 ]] && SPOT_FLAG=(--spot)
    run gcloud compute tpus queued-resources create "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --accelerator-type="$TYPE" --runtime-version="$RUNTIME" "${SLICE_FLAGS[@]}" "${SPOT_FLAG[@]}"
    echo "# wait until ACTIVE:" >&2
    run gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --format='value(state.state)'
    ;;
  setup)
    need NAME ZONE BUCKET
    [[ "$BUCKET" == gs://* ]] || die "--bucket=$BUCKET: give a gs:// path"
    BUCKET_NAME="${BUCKET#gs://}"; BUCKET_NAME="${BUCKET_NAME%%/*}"
    BUCKET_DIR="${BUCKET#gs://$BUCKET_NAME}"; BUCKET_DIR="${BUCKET_DIR#/}"
    ONLY_DIR=""; [[ -n "$BUCKET_DIR" ]] && ONLY_DIR="--only-dir=$BUCKET_DIR"
    ssh_all "set -e
sudo apt-get update -qq && sudo apt-get install -y -qq python3.12-venv fuse
command -v gcsfuse >/dev/null || { curl -fsSL https://github.com/GoogleCloudPlatform/gcsfuse/releases/download/v2.4.0/gcsfuse_2.4.0_amd64.deb -o /tmp/gcsfuse.deb && sudo dpkg -i /tmp/gcsfuse.deb; }
[ -d deepseek_jax ] || git clone --branch $BRANCH $REPO deepseek_jax
cd deepseek_jax && git fetch -q && git checkout -q $BRANCH && git pull -q
python3.12 -m venv .venv && .venv/bin/pip install -q -r requirements-dev.txt && .venv/bin/pip install -q -e .[tpu]
sudo mkdir -p /mnt/run && sudo chown \$USER /mnt/run
mountpoint -q /mnt/run || gcsfuse --implicit-dirs $ONLY_DIR $BUCKET_NAME /mnt/run"
    ;;
  run)
    need NAME ZONE RUN
    [[ -n "$BUCKET" ]] || echo "# note: without --bucket the run directory /mnt/run must already be mounted (setup)" >&2
    QUOTED_EXTRA=""; for a in "${EXTRA[@]}"; do QUOTED_EXTRA+=" $(printf '%q' "$a")"; done
    DCN=""; [[ "$SLICES" != 1 ]] && DCN=" --config.mesh.dcn_data=-1"
    ssh_all "cd deepseek_jax && mkdir -p /mnt/run/$RUN/logs && nohup .venv/bin/python -m experiments.pretrain --config=experiments/configs/pretrain.py:$CONFIG --workdir=/mnt/run/$RUN$DCN$QUOTED_EXTRA > /mnt/run/$RUN/logs/\$(hostname).log 2>&1 &"
    ;;
  logs)
    need NAME ZONE RUN
    NODE="$(nodes | head -n1)"
    run gcloud compute tpus tpu-vm ssh "$NODE" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker="$WORKER" \
      --command="tail -n 100 -F /mnt/run/$RUN/logs/\$(hostname).log"
    ;;
  delete)
    need NAME ZONE
    run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --force --quiet
    ;;
  *)
    echo "usage: $0 create|setup|run|logs|delete --name=NAME --zone=ZONE [...] [--dry-run]" >&2
    exit 2 ;;
esac
