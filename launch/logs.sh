#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Show or stream the per-worker logs written by launch/run.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<USAGE
Usage: launch/logs.sh --name NAME --zone ZONE [options]

Prints the last lines of the log of a run started by launch/run.sh, from one worker (default:
worker 0 of slice 0, which is process 0 and writes the training metrics) or from all of them.
With --follow it keeps streaming (tail -F) until Ctrl-C; the run itself is not affected.

Options:
  --worker W           worker index, or 'all' [default 0]
  --node K             slice index with --num-slices > 1, or 'all' [default 0]
  --all                every worker of every slice (same as --worker all --node all)
  --lines N            lines to show [default 100]
  --follow, -f         keep streaming
  --run-name NAME      the run's --run-name [default: the latest run]

To keep a copy here: launch/logs.sh ... --all > run.log

${COMMON_OPTIONS_HELP}
USAGE
}

WORKER=0
NODE=0
LINES=100
FOLLOW=0
RUN_NAME=${RUN_NAME:-}
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --worker | --worker=*) take_value "$@"; WORKER=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --node | --node=*) take_value "$@"; NODE=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --all) WORKER=all; NODE=all; shift ;;
    --lines | --lines=*) take_value "$@"; LINES=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    -f | --follow) FOLLOW=1; shift ;;
    --run-name | --run-name=*) take_value "$@"; RUN_NAME=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    *) if parse_common_option "$@"; then shift "$OPT_SHIFT"; else unknown_option "$1"; fi ;;
  esac
done
check_common
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "bad --worker '$WORKER': an index or 'all'"
[[ $NODE == all || $NODE =~ ^[0-9]+$ ]] || die "bad --node '$NODE': an index or 'all'"
[[ $LINES =~ ^[0-9]+$ ]] || die "bad --lines '$LINES'"
[[ -z $RUN_NAME || $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad --run-name '$RUN_NAME'"

if [[ -n $RUN_NAME ]]; then
  LOG="\"${REMOTE_LOG_DIR}/${RUN_NAME}-\$(hostname).log\""
else
  LOG="\"${REMOTE_LOG_DIR}/latest.log\""
fi
TAIL="tail -n ${LINES}"
[[ $FOLLOW == 0 ]] || TAIL+=" -F"
ssh_one_cmd "$NODE" "$WORKER" "${TAIL} ${LOG}"
run "${SSH_CMD[@]}"
