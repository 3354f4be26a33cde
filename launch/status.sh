#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Describe a queued resource (state: WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED...).
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<USAGE
Usage: launch/status.sh --name NAME --zone ZONE [options]
       launch/status.sh --list --zone ZONE [--project PROJECT]

Describes the queued resource NAME (its state.state is ACTIVE once the slices are up; SUSPENDED
or FAILED after a preemption of a spot slice), or with --direct the TPU VM NAME.

Options:
  --list               list the queued resources (with --direct: the TPU VMs) of the zone

${COMMON_OPTIONS_HELP}
USAGE
}

LIST=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --list) LIST=1; shift ;;
    *) if parse_common_option "$@"; then shift "$OPT_SHIFT"; else unknown_option "$1"; fi ;;
  esac
done

GROUP=queued-resources
[[ $DIRECT == 0 ]] || GROUP=tpu-vm
if [[ $LIST == 1 ]]; then
  [[ -n $ZONE ]] || die "missing required --zone (or ZONE)"
  location_flags
  run gcloud compute tpus "$GROUP" list "${LOCATION_FLAGS[@]}"
else
  check_common
  location_flags
  run gcloud compute tpus "$GROUP" describe "$TPU_NAME" "${LOCATION_FLAGS[@]}"
fi
