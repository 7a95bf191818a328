#!/usr/bin/env bash
# GKE launch of a pretraining run on TPU slices: with a JobSet (kubectl) or with xpk.
#
#   launch/gke/launch.sh jobset --run=v3-001 --type=v5p-1024 [--slices=2] --image=IMAGE \
#       --bucket=BUCKET [--config=v3-671b] [--service-account=KSA] [--grace=300] [--queue=Q] \
#       [--env=NAME=VALUE ...] [--compile-cache=gs://BUCKET/xla] [--dry-run] [-- EXTRA ARGS]
#   launch/gke/launch.sh xpk-storage --cluster=CLUSTER --zone=ZONE --bucket=BUCKET [--project=ID]
#       (once per cluster: attaches the bucket at /mnt/run for every later workload)
#   launch/gke/launch.sh xpk --run=v3-001 --type=v5p-1024 [--slices=2] --image=IMAGE \
#       --cluster=CLUSTER --zone=ZONE [--project=ID] [--env=...] [--compile-cache=...] \
#       [--dry-run] [-- EXTRA ARGS]
#   launch/gke/launch.sh delete --run=v3-001 [--cluster=CLUSTER --zone=ZONE] [--dry-run]
#
# IMAGE is a container with this repository at its working directory and the README's set-up
# done (`pip install -r requirements-dev.txt && pip install -e .[tpu]`). BUCKET is a GCS bucket
# name (no gs://); the run writes to gs://BUCKET/RUN through a FUSE mount at /mnt/run, mounted
# with rename-dir-limit (Orbax commits checkpoints by renaming directories).
# --env=NAME=VALUE (repeatable) sets a variable in every pod (LIBTPU_INIT_ARGS, XLA_FLAGS, ...);
# --compile-cache=DIR sets JAX_COMPILATION_CACHE_DIR (gs:// is shared by every host and rerun).
# Exit codes (deepseek_jax/train/run.py): restarts happen on 42 (preempted after saving), never
# on a failure (jobset.yaml's podFailurePolicy; xpk's --restart-on-exit-codes).
# --dry-run prints the rendered YAML and the commands instead of running them.
# Before `jobset` and `xpk` submit anything, the run's fit on the slice is checked on this
# machine (`python -m experiments.doctor --target=tpu-TYPE --config=...:CONFIG` with the
# overrides after `--`: the train step compiled ahead of time for the slice, no TPU needed); a
# run that would not fit is refused. --fit-check=analytic (the planner's estimate, seconds) or
# --fit-check=off; $PYTHON (default python3) must have the project installed.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

ACTION="${1:-}"; shift || true
RUN="" TYPE="v5p-1024" SLICES=1 IMAGE="" BUCKET="" CONFIG="v3-671b" SERVICE_ACCOUNT="default"
CLUSTER="" ZONE="" PROJECT="" MAX_RESTARTS=3 DRY_RUN=0 EXTRA=() ENVS=() COMPILE_CACHE=""
GRACE_SECONDS=300 QUEUE="" STORAGE_SIZE_GB=1 RENAME_DIR_LIMIT=200000 EXIT_PREEMPTED=42
FIT_CHECK="compile"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run=*) RUN="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --slices=*) SLICES="${1#*=}" ;;
    --image=*) IMAGE="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}"; BUCKET="${BUCKET#gs://}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --service-account=*) SERVICE_ACCOUNT="${1#*=}" ;;
    --cluster=*) CLUSTER="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --max-restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --grace=*) GRACE_SECONDS="${1#*=}" ;;
    --queue=*) QUEUE="${1#*=}" ;;
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
need() { for v in "$@"; do [[ -n "${!v}" ]] || die "--$(echo "$v" | tr 'A-Z_' 'a-z-')=... is required for '$ACTION'"; done; }
run() { if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

# Accelerator type → GKE node labels, slice topology, hosts and chips per host: 4, except the
# one-host v5e/v6e slices of 8 chips (v5litepod-8, v6e-8: one 2x4 node).
slice_facts() {
  local gen="${TYPE%-*}" n="${TYPE##*-}" chips dims
  case "$gen" in
    v5p) GKE_ACCELERATOR="tpu-v5p-slice"; chips=$((n / 2)); dims=3 ;;
    v5litepod) GKE_ACCELERATOR="tpu-v5-lite-podslice"; chips=$n; dims=2 ;;
    v6e) GKE_ACCELERATOR="tpu-v6e-slice"; chips=$n; dims=2 ;;
    *) die "--type=$TYPE: use v5p-N, v5litepod-N or v6e-N" ;;
  esac
  (( chips >= 4 && (chips & (chips - 1)) == 0 )) || die "--type=$TYPE: $chips chips; use a power-of-two slice of at least 4 chips"
  # Cloud TPU slice shapes: double the smallest dimension first (v5p 512 chips → 8x8x8).
  local -a shape; for ((i = 0; i < dims; i++)); do shape[i]=1; done
  local prod=1
  while (( prod < chips )); do
    local m=0; for ((i = 1; i < dims; i++)); do (( shape[i] < shape[m] )) && m=$i; done
    shape[m]=$((shape[m] * 2)); prod=$((prod * 2))
  done
  TOPOLOGY="$(printf '%s\n' "${shape[@]}" | sort -n | awk '$1>1' | paste -sd x)"
  local ones; ones="$(printf '%s\n' "${shape[@]}" | awk '$1==1' | wc -l)"
  for ((i = 0; i < ones; i++)); do TOPOLOGY+="x1"; done
  CHIPS_PER_HOST=4
  [[ "$gen" != v5p && "$chips" == 8 ]] && CHIPS_PER_HOST=8
  HOSTS=$((chips / CHIPS_PER_HOST))
}

# The fit check before anything is submitted (see above).
source "$HERE/../fit_check.sh"

EXTRA_ARGS=""; for a in "${EXTRA[@]}"; do EXTRA_ARGS+=" $(printf '%q' "$a")"; done
[[ "$SLICES" != 1 ]] && EXTRA_ARGS=" --config.mesh.dcn_data=-1$EXTRA_ARGS"
[[ -n "$COMPILE_CACHE" ]] && ENVS+=("JAX_COMPILATION_CACHE_DIR=$COMPILE_CACHE")
for e in "${ENVS[@]}"; do [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$e: use --env=NAME=VALUE"; done

case "$ACTION" in
  jobset)
    need RUN IMAGE BUCKET
    slice_facts
    fit_check "$HERE/../.." submitted
    # Placeholders from the environment; EXTRA_ENV (NAME=VALUE lines) becomes env entries at
    # its line's indentation, values JSON-quoted (valid YAML strings).
    YAML="$(RUN="$RUN" SLICES="$SLICES" HOSTS="$HOSTS" GKE_ACCELERATOR="$GKE_ACCELERATOR" \
      TOPOLOGY="$TOPOLOGY" IMAGE="$IMAGE" CONFIG="$CONFIG" EXTRA_ARGS="$EXTRA_ARGS" \
      BUCKET="$BUCKET" SERVICE_ACCOUNT="$SERVICE_ACCOUNT" MAX_RESTARTS="$MAX_RESTARTS" \
      CHIPS_PER_HOST="$CHIPS_PER_HOST" GRACE_SECONDS="$GRACE_SECONDS" \
      RENAME_DIR_LIMIT="$RENAME_DIR_LIMIT" EXTRA_ENV="$(printf '%s\n' "${ENVS[@]}")" \
      QUEUE_LABEL="${QUEUE:+labels: {kueue.x-k8s.io/queue-name: $QUEUE\}}" \
      python3 -c 'import json, os, re, sys
text = open(sys.argv[1]).read()
def env_block(m):
    pairs = [line.split("=", 1) for line in os.environ["EXTRA_ENV"].splitlines() if line]
    return "".join(f"{m.group(1)}- name: {k}\n{m.group(1)}  value: {json.dumps(v)}\n"
                   for k, v in pairs)
text = re.sub(r"^( *)\$\{EXTRA_ENV\}\n", env_block, text, flags=re.M)
if not os.environ["QUEUE_LABEL"]:
    text = re.sub(r"^ *\$\{QUEUE_LABEL\}\n", "", text, flags=re.M)
print(re.sub(r"\$\{(\w+)\}", lambda m: os.environ[m.group(1)], text), end="")' "$HERE/jobset.yaml")"
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "$YAML"; echo "---"; echo "kubectl apply -f - # the YAML above"
      echo "kubectl logs -f --max-log-requests=$((HOSTS * SLICES)) -l jobset.sigs.k8s.io/jobset-name=$RUN"
    else
      echo "$YAML" | kubectl apply -f -
      echo "logs: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$RUN" >&2
    fi
    ;;
  xpk-storage)
    # Once per cluster: one storage per bucket, auto-mounted at /mnt/run in every workload.
    need CLUSTER ZONE BUCKET
    PROJECT_FLAG=(); [[ -n "$PROJECT" ]] && PROJECT_FLAG=(--project="$PROJECT")
    run xpk storage attach "$BUCKET" --type=gcsfuse --bucket="$BUCKET" \
      --size="$STORAGE_SIZE_GB" --mount-point=/mnt/run --readonly=false --auto-mount=true \
      --mount-options="implicit-dirs,rename-dir-limit=$RENAME_DIR_LIMIT" \
      --cluster="$CLUSTER" --zone="$ZONE" "${PROJECT_FLAG[@]}"
    ;;
  xpk)
    # xpk sets the TPU and MEGASCALE variables itself; the bucket comes from `xpk-storage`.
    need RUN IMAGE CLUSTER ZONE
    slice_facts
    fit_check "$HERE/../.." submitted
    PROJECT_FLAG=(); [[ -n "$PROJECT" ]] && PROJECT_FLAG=(--project="$PROJECT")
    ENV_FLAGS=(); for e in "${ENVS[@]}"; do ENV_FLAGS+=(--env="$e"); done
    run xpk workload create --workload="$RUN" --cluster="$CLUSTER" --zone="$ZONE" \
      "${PROJECT_FLAG[@]}" --device-type="$TYPE" --num-slices="$SLICES" \
      --docker-image="$IMAGE" --max-restarts="$MAX_RESTARTS" \
      --restart-on-exit-codes="$EXIT_PREEMPTED" "${ENV_FLAGS[@]}" \
      --command="python -m experiments.pretrain --config=experiments/configs/pretrain.py:$CONFIG --workdir=/mnt/run/$RUN$EXTRA_ARGS"
    ;;
  delete)
    need RUN
    if [[ -n "$CLUSTER" ]]; then
      PROJECT_FLAG=(); [[ -n "$PROJECT" ]] && PROJECT_FLAG=(--project="$PROJECT")
      run xpk workload delete --workload="$RUN" --cluster="$CLUSTER" --zone="$ZONE" "${PROJECT_FLAG[@]}"
    else
      run kubectl delete jobset "$RUN"
    fi
    ;;
  *)
    echo "usage: $0 jobset|xpk-storage|xpk|delete --run=NAME ... [--dry-run]" >&2; exit 2 ;;
esac
