#!/usr/bin/env bash
# Cloud TPU VM pods: create (queued resources), set up, run the same command on every worker,
# stream logs, tear down. Single slice or multi-slice (--slices=N: DCN between slices).
#
#   launch/tpu_pod.sh create   --name=v3 --zone=us-east5-a --type=v5p-1024 [--slices=2] [--spot] \
#                              [--config=v3-671b] [--fit-check=compile|analytic|off] [-- --config.FIELD=VALUE ...]
#   launch/tpu_pod.sh setup    --name=v3 --zone=us-east5-a --bucket=gs://BUCKET/runs [--repo=URL]
#   launch/tpu_pod.sh run      --name=v3 --zone=us-east5-a --config=v3-671b --run=v3-001 \
#                              [--env=LIBTPU_INIT_ARGS=...] [--compile-cache=gs://BUCKET/xla] \
#                              [-- --config.train.steps=1000 ...]
#   launch/tpu_pod.sh doctor   --name=v3 --zone=us-east5-a
#   launch/tpu_pod.sh logs     --name=v3 --zone=us-east5-a --run=v3-001 [--worker=0]
#   launch/tpu_pod.sh delete   --name=v3 --zone=us-east5-a
#
# Every subcommand takes --dry-run: it prints the gcloud commands instead of running them.
# --project=ID is passed to gcloud when given (otherwise gcloud's configured project is used).
#
# How the pieces fit:
#   * create: first the fit check, here on this machine (`python -m experiments.doctor
#     --target=tpu-TYPE --config=...:CONFIG`, with the overrides after `--`): the run's train
#     step compiled ahead of time for the slice (libtpu's compile-only devices, no TPU needed;
#     minutes for a 671B step on a workstation); a run that would not fit stops here, before
#     a pod-hour is spent. --fit-check=analytic uses the planner's estimate (seconds),
#     --fit-check=off skips it; $PYTHON (default python3) must have the project installed.
#     Then `gcloud compute tpus queued-resources create`, with --node-count for multi-slice
#     (nodes NAME-0 … NAME-{N-1}; the TPU runtime sets the MEGASCALE_* variables on them).
#   * setup: on every worker of every slice, clones the repository, installs uv and with it a
#     Python 3.12 venv (TPU VM images are Ubuntu 22.04 with Python 3.10, older than the
#     project's 3.11+, and have no python3.12 package), requirements-dev.txt and `-e .[tpu]`;
#     installs gcsfuse from Google's apt repository and mounts the bucket at /mnt/run with
#     --rename-dir-limit (Orbax commits a checkpoint by renaming its directory; gcsfuse refuses
#     directory renames without it).
#   * run: the same command on all workers (`--worker=all`), in the background under nohup so
#     that it survives the ssh session; output goes to /mnt/run/RUN/logs/<host>.log and the exit
#     code to <host>.exit (0 finished, 42 preempted after saving: recreate the pod if needed and
#     `run` again to resume; anything else failed). `--config.mesh.distributed=true` makes the
#     entrypoint call `jax.distributed.initialize()`, which reads the workers from the TPU
#     metadata server; with several slices the mesh puts `dcn_data` across them
#     (mesh.dcn_data = -1 = one per slice). `--env=NAME=VALUE` (repeatable) sets variables for
#     the trainer (LIBTPU_INIT_ARGS, XLA_FLAGS, ...); `--compile-cache=DIR` sets
#     JAX_COMPILATION_CACHE_DIR (a gs:// path is shared by every worker and later runs).
#   * doctor: the preflight (experiments/doctor.py) on every worker, in the foreground: versions,
#     jax.distributed across all workers, device count, one collective, and a directory rename
#     under /mnt/run. Run it after `setup`; every worker prints its table.
#   * logs: follows worker 0's log (or --worker=K) of one slice.
#   * delete: deletes the queued resource and its nodes.
set -euo pipefail

ACTION="${1:-}"; shift || true
NAME="" ZONE="" TYPE="v5p-1024" SLICES=1 PROJECT="" RUNTIME="" SPOT=0
BUCKET="" REPO="https://github.com/OWNER/deepseek_jax.git" BRANCH="main" CONFIG="v3-671b"
RUN="" WORKER=0 DRY_RUN=0 EXTRA=() ENVS=() COMPILE_CACHE="" FIT_CHECK="compile"
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
    --env=*) ENVS+=("${1#*=}") ;;
    --compile-cache=*) COMPILE_CACHE="${1#*=}" ;;
    --fit-check=*) FIT_CHECK="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "error: $*" >&2; exit 2; }
RENAME_DIR_LIMIT=200000   # gcsfuse: directories with up to this many objects can be renamed
need() { for v in "$@"; do [[ -n "${!v}" ]] || die "--$(echo "$v" | tr 'A-Z' 'a-z')=... is required for '$ACTION'"; done; }
# Prints a command under --dry-run, runs it otherwise. Arguments with shell characters are
# single-quoted (newlines kept inside the quotes), so the line reads back with any POSIX shell
# parser (`shlex.split`), unlike bash's $'...' quoting.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local a out=() sq="'\\''"
    for a in "$@"; do
      if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/$sq}'"); fi
    done
    echo "${out[*]}"
  else
    "$@"
  fi
}
PROJECT_FLAG=(); [[ -n "$PROJECT" ]] && PROJECT_FLAG=(--project="$PROJECT")

# The fit check before anything is created (see above).
source "$(dirname "$0")/fit_check.sh"

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
    fit_check "$(dirname "$0")/.." created
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
    # gcsfuse from Google's apt repository (its current release); uv brings Python 3.12.
    ssh_all "set -e
if ! command -v gcsfuse >/dev/null; then
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH=\$HOME/.local/bin:\$PATH
[ -d deepseek_jax ] || git clone --branch $BRANCH $REPO deepseek_jax
cd deepseek_jax && git fetch -q && git checkout -q $BRANCH && git pull -q
uv venv --python=3.12 --allow-existing .venv
uv pip install --python=.venv/bin/python -q -r requirements-dev.txt -e .[tpu]
sudo mkdir -p /mnt/run && sudo chown \$USER /mnt/run
mountpoint -q /mnt/run || gcsfuse --implicit-dirs --rename-dir-limit=$RENAME_DIR_LIMIT $ONLY_DIR $BUCKET_NAME /mnt/run"
    ;;
  run)
    need NAME ZONE RUN
    [[ -n "$BUCKET" ]] || echo "# note: without --bucket the run directory /mnt/run must already be mounted (setup)" >&2
    [[ -n "$COMPILE_CACHE" ]] && ENVS+=("JAX_COMPILATION_CACHE_DIR=$COMPILE_CACHE")
    for e in "${ENVS[@]}"; do [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$e: use --env=NAME=VALUE"; done
    TRAIN=(env "${ENVS[@]}" .venv/bin/python -m experiments.pretrain
           --config=experiments/configs/pretrain.py:"$CONFIG" --workdir=/mnt/run/"$RUN"
           --config.mesh.distributed=true)
    [[ "$SLICES" != 1 ]] && TRAIN+=(--config.mesh.dcn_data=-1)
    TRAIN+=("${EXTRA[@]}")
    LOGS="/mnt/run/$RUN/logs"
    # The trainer, then its exit code into HOST.exit, in one shell that outlives the ssh session.
    INNER="$(printf '%q ' "${TRAIN[@]}"); echo \$? > $LOGS/\$(hostname).exit"
    ssh_all "cd deepseek_jax && mkdir -p $LOGS && nohup bash -c $(printf '%q' "$INNER") > $LOGS/\$(hostname).log 2>&1 &"
    ;;
  doctor)
    need NAME ZONE
    ssh_all "cd deepseek_jax && .venv/bin/python -m experiments.doctor --workdir=/mnt/run/.doctor --distributed=true"
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
    echo "usage: $0 create|setup|doctor|run|logs|delete --name=NAME --zone=ZONE [...] [--dry-run]" >&2
    exit 2 ;;
esac
