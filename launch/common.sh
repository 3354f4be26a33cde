# shellcheck shell=bash disable=SC2034,SC2016
# (SC2034: the variables set here are read by the scripts that source this file;
#  SC2016: '$HOME' in the remote paths is meant for the worker's shell.)
# Shared by the launch/*.sh scripts (sourced, never run). Holds the configuration variables, the
# option parser for the options every script takes, the accelerator table, and `run`, which
# executes a command or, in dry-run mode, prints it as one copy-pasteable shell line.
#
# Every option has an environment-variable default, so a shell can export them once:
#   TPU_NAME  ZONE  PROJECT  NUM_SLICES (1)  DRY_RUN (0)  DIRECT (0)
#   REMOTE_REPO_DIR ($HOME/nl_jax)  REMOTE_VENV ($HOME/venv-nl_jax)  REMOTE_LOG_DIR ($HOME/nl_logs)
# Paths named REMOTE_* are written into the remote command unexpanded, so `$HOME` means the
# worker's home directory.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: launch/*.sh need bash >= 4.4 (this is ${BASH_VERSION}); on macOS: brew install bash" >&2
  exit 2
fi

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
NUM_SLICES=${NUM_SLICES:-1}
DRY_RUN=${DRY_RUN:-0}
DIRECT=${DIRECT:-0}
REMOTE_REPO_DIR=${REMOTE_REPO_DIR:-'$HOME/nl_jax'}
REMOTE_VENV=${REMOTE_VENV:-'$HOME/venv-nl_jax'}
REMOTE_LOG_DIR=${REMOTE_LOG_DIR:-'$HOME/nl_logs'}

LAUNCH_DIR=$(cd "${BASH_SOURCE[0]%/*}" && pwd)
REPO_ROOT=$(cd "${LAUNCH_DIR}/.." && pwd)

COMMON_OPTIONS_HELP="Common options (each also read from the environment variable in brackets):
  --name NAME          queued resource / TPU VM name [TPU_NAME]; with --num-slices N > 1 the
                       slices are the nodes NAME-0 .. NAME-(N-1)
  --zone ZONE          e.g. us-east5-a [ZONE]
  --project PROJECT    GCP project; gcloud's default project if omitted [PROJECT]
  --num-slices N       number of slices (multislice when N > 1) [NUM_SLICES, default 1]
  --direct             the slice was made by 'tpu-vm create', not a queued resource [DIRECT=1]
  --dry-run            print the exact commands instead of running them (gcloud not needed) [DRY_RUN=1]
  -h, --help           this message"

die() {
  echo "error: $*" >&2
  exit 2
}

info() {
  echo "[${0##*/}] $*" >&2
}

# quote ARG: ARG as one shell word. Safe words stay bare, `--flag=value` keeps the flag bare and
# quotes the value, anything else is single-quoted.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./=:,@%+^-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_always "${BASH_REMATCH[2]}"
  else
    quote_always "$s"
  fi
}

quote_always() {
  local q="'\\''"
  printf "'%s'" "${1//\'/$q}"
}

# join_quoted ARG...: the arguments as one shell command line.
join_quoted() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

# run CMD ARG...: run it, or with DRY_RUN=1 print it (one line on stdout) and return 0.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    join_quoted "$@"
    echo
    return 0
  fi
  if [[ $1 == gcloud ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or add --dry-run to only print the commands"
  fi
  "$@"
}

# take_value "$@": for `--opt VALUE` or `--opt=VALUE` sets OPT_VALUE and OPT_SHIFT.
take_value() {
  if [[ $1 == *=* ]]; then
    OPT_VALUE=${1#*=}
    OPT_SHIFT=1
  elif (($# >= 2)); then
    OPT_VALUE=$2
    OPT_SHIFT=2
  else
    die "option ${1} needs a value (see --help)"
  fi
}

# parse_common_option "$@": consumes one common option; sets OPT_SHIFT, or returns 1.
parse_common_option() {
  case $1 in
    --name | --name=*) take_value "$@"; TPU_NAME=$OPT_VALUE ;;
    --zone | --zone=*) take_value "$@"; ZONE=$OPT_VALUE ;;
    --project | --project=*) take_value "$@"; PROJECT=$OPT_VALUE ;;
    --num-slices | --num-slices=*) take_value "$@"; NUM_SLICES=$OPT_VALUE ;;
    --direct) DIRECT=1; OPT_SHIFT=1 ;;
    --dry-run) DRY_RUN=1; OPT_SHIFT=1 ;;
    *) return 1 ;;
  esac
}

unknown_option() {
  die "unknown option '$1' (see --help)"
}

# check_common: the required common options are there and consistent.
check_common() {
  [[ -n $TPU_NAME ]] || die "missing required --name (or TPU_NAME)"
  [[ -n $ZONE ]] || die "missing required --zone (or ZONE)"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "bad --name '$TPU_NAME': lowercase letters, digits and '-', starting with a letter"
  [[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "bad --num-slices '$NUM_SLICES': a positive integer"
  [[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1, not '$DRY_RUN'"
  if [[ $DIRECT == 1 ]] && ((NUM_SLICES > 1)); then
    die "--direct (tpu-vm create) makes one slice; multislice needs a queued resource"
  fi
}

# The --zone / --project flags of every gcloud call.
location_flags() {
  LOCATION_FLAGS=("--zone=${ZONE}")
  if [[ -n $PROJECT ]]; then
    LOCATION_FLAGS+=("--project=${PROJECT}")
  fi
}

# normalize_accelerator TYPE: sets ACCELERATOR, GENERATION, ACCEL_SIZE, DEFAULT_RUNTIME, NUM_WORKERS.
# v5e-N is accepted as the alias of gcloud's v5litepod-N.
normalize_accelerator() {
  local acc=$1
  [[ $acc == v5e-* ]] && acc="v5litepod-${acc#v5e-}"
  if ! [[ $acc =~ ^(v4|v5p|v5litepod|v6e)-([0-9]+)$ ]]; then
    die "unknown accelerator type '$1': expected v4-N, v5p-N, v5litepod-N (or v5e-N), v6e-N, e.g. v5p-64"
  fi
  GENERATION=${BASH_REMATCH[1]}
  ACCEL_SIZE=${BASH_REMATCH[2]}
  local n=$((10#$ACCEL_SIZE))
  if ((n < 1 || (n & (n - 1)) != 0)); then
    die "unknown accelerator type '$1': the size must be a power of two"
  fi
  case $GENERATION in
    v4 | v5p)
      # The size counts TensorCores: 2 per chip, 4 chips per host.
      ((n >= 8)) || die "unknown accelerator type '$1': ${GENERATION} sizes start at ${GENERATION}-8"
      NUM_WORKERS=$((n / 8))
      ;;
    v5litepod | v6e)
      # The size counts chips: up to 8 on one host, 4 per host beyond that, 256 per slice.
      ((n <= 256)) || die "unknown accelerator type '$1': ${GENERATION} slices stop at ${GENERATION}-256"
      if ((n <= 8)); then NUM_WORKERS=1; else NUM_WORKERS=$((n / 4)); fi
      ;;
  esac
  case $GENERATION in
    v4) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
    v5p) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  esac
  ACCELERATOR="${GENERATION}-${n}"
}

# ssh_all_cmd REMOTE_SCRIPT: sets SSH_CMD to the gcloud call running it on every worker of every
# slice. One slice: `tpu-vm ssh NAME --worker=all`; several: `queued-resources ssh --node=all`.
ssh_all_cmd() {
  ssh_one_cmd all all "$1"
}

# ssh_one_cmd NODE WORKER REMOTE_SCRIPT (NODE is ignored for one slice).
ssh_one_cmd() {
  local node=$1 worker=$2 script=$3
  location_flags
  if ((NUM_SLICES > 1)); then
    SSH_CMD=(gcloud compute tpus queued-resources ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}"
      "--node=${node}" "--worker=${worker}" "--command=${script}")
  else
    SSH_CMD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}"
      "--worker=${worker}" "--command=${script}")
  fi
}

# scp_all_cmd LOCAL_FILE REMOTE_PATH: sets SCP_CMD to copy a file to every worker of every slice.
scp_all_cmd() {
  local src=$1 dest=$2
  location_flags
  if ((NUM_SLICES > 1)); then
    SCP_CMD=(gcloud compute tpus queued-resources scp "$src" "${TPU_NAME}:${dest}" "${LOCATION_FLAGS[@]}"
      --node=all --worker=all)
  else
    SCP_CMD=(gcloud compute tpus tpu-vm scp "$src" "${TPU_NAME}:${dest}" "${LOCATION_FLAGS[@]}"
      --worker=all)
  fi
}
