#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Tear down a slice (or all slices of a multislice queued resource).
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<USAGE
Usage: launch/delete.sh --name NAME --zone ZONE [options]

Deletes the queued resource NAME together with its TPU VMs (--force), whatever its state
(waiting, active, preempted/suspended, failed); with --direct, deletes the TPU VM NAME. Data on
the workers' disks is lost; checkpoints in a gs:// workdir are not touched.

Options:
  --async              return without waiting for the deletion to finish

${COMMON_OPTIONS_HELP}
USAGE
}

ASYNC=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --async) ASYNC=(--async); shift ;;
    *) if parse_common_option "$@"; then shift "$OPT_SHIFT"; else unknown_option "$1"; fi ;;
  esac
done
check_common
location_flags

if [[ $DIRECT == 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" --quiet "${ASYNC[@]}"
else
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" --force --quiet "${ASYNC[@]}"
fi
