#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create a Cloud TPU slice (or N slices for multislice) as a queued resource.
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<EOF
Usage: launch/create.sh --name NAME --zone ZONE --accelerator TYPE [options] [-- EXTRA_GCLOUD_ARGS...]

Creates a queued resource NAME holding one TPU slice (node NAME), or with --num-slices N > 1 a
multislice queued resource with the nodes NAME-0 .. NAME-(N-1) (--node-count / --node-prefix).
The queued resource waits in line until capacity is there; watch it with launch/status.sh.

Options:
  --accelerator TYPE     v4-N, v5p-N, v5litepod-N (alias v5e-N), v6e-N; e.g. v5p-64, v5e-256
  --mode MODE            spot | reserved | on-demand | best-effort   [MODE, default on-demand]
                         spot: preemptible at any time, cheapest; reserved: your reservation;
                         best-effort: uses 'gcloud alpha' (--best-effort)
  --runtime-version V    TPU software version [RUNTIME_VERSION]; default per generation:
                         v4: tpu-ubuntu2204-base  v5p: v2-alpha-tpuv5
                         v5e: v2-alpha-tpuv5-lite  v6e: v2-alpha-tpuv6e
  --valid-until D        give up if not provisioned within D (e.g. 6h) (--valid-until-duration)
  --direct               'gcloud compute tpus tpu-vm create' now (fails without capacity)
                         instead of a queued resource; one slice only
  -- ARGS...             passed to gcloud unchanged (e.g. --network=..., --internal-ips)

${COMMON_OPTIONS_HELP}

Example (prints the command only):
  launch/create.sh --dry-run --name hope-760m --zone us-east5-a --project my-proj \\
      --accelerator v5p-64 --mode spot
EOF
}

ACCELERATOR_ARG=${ACCELERATOR:-}
MODE=${MODE:-on-demand}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
VALID_UNTIL=""
EXTRA=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --accelerator | --accelerator=* | --accelerator-type | --accelerator-type=*)
      take_value "$@"; ACCELERATOR_ARG=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --mode | --mode=*) take_value "$@"; MODE=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --spot | --reserved | --on-demand | --best-effort) MODE=${1#--}; shift ;;
    --runtime-version | --runtime-version=*) take_value "$@"; RUNTIME_VERSION=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --valid-until | --valid-until=*) take_value "$@"; VALID_UNTIL=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) if parse_common_option "$@"; then shift "$OPT_SHIFT"; else unknown_option "$1"; fi ;;
  esac
done

check_common
[[ -n $ACCELERATOR_ARG ]] || die "missing required --accelerator (e.g. v5p-64)"
normalize_accelerator "$ACCELERATOR_ARG"
RUNTIME_VERSION=${RUNTIME_VERSION:-$DEFAULT_RUNTIME}
location_flags

MODE_FLAGS=()
GCLOUD=(gcloud)
case $MODE in
  spot) MODE_FLAGS=(--spot) ;;
  reserved) MODE_FLAGS=(--reserved) ;;
  on-demand) ;;
  best-effort) MODE_FLAGS=(--best-effort); GCLOUD=(gcloud alpha) ;;
  *) die "unknown --mode '$MODE': spot, reserved, on-demand or best-effort" ;;
esac

if [[ $DIRECT == 1 ]]; then
  [[ $MODE != best-effort ]] || die "--mode best-effort needs a queued resource (drop --direct)"
  [[ -z $VALID_UNTIL ]] || die "--valid-until needs a queued resource (drop --direct)"
  CMD=("${GCLOUD[@]}" compute tpus tpu-vm create "$TPU_NAME" "${LOCATION_FLAGS[@]}"
    "--accelerator-type=${ACCELERATOR}" "--version=${RUNTIME_VERSION}" "${MODE_FLAGS[@]}")
else
  CMD=("${GCLOUD[@]}" compute tpus queued-resources create "$TPU_NAME" "${LOCATION_FLAGS[@]}"
    "--accelerator-type=${ACCELERATOR}" "--runtime-version=${RUNTIME_VERSION}")
  if ((NUM_SLICES > 1)); then
    CMD+=("--node-count=${NUM_SLICES}" "--node-prefix=${TPU_NAME}")
  else
    CMD+=("--node-id=${TPU_NAME}")
  fi
  CMD+=("${MODE_FLAGS[@]}")
  [[ -z $VALID_UNTIL ]] || CMD+=("--valid-until-duration=${VALID_UNTIL}")
fi
CMD+=("${EXTRA[@]}")

info "${NUM_SLICES} x ${ACCELERATOR} (${NUM_WORKERS} worker VM(s) per slice), runtime ${RUNTIME_VERSION}, ${MODE}"
run "${CMD[@]}"
if [[ $DRY_RUN == 0 && $DIRECT == 0 ]]; then
  info "queued; watch it reach ACTIVE with: launch/status.sh --name ${TPU_NAME} --zone ${ZONE}"
fi
