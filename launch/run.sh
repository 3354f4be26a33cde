#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run one command on every worker of every slice, detached, with a log file per worker.
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<EOF
Usage: launch/run.sh --name NAME --zone ZONE [options] -- COMMAND [ARGS...]
       launch/run.sh --name NAME --zone ZONE --stop

Runs COMMAND at the same time on all workers (gcloud ... ssh --worker=all), from the unpacked
checkout with the setup.sh venv first on PATH. By default it is started with nohup in its own
session and outlives the ssh connection; its output goes to
  REMOTE_LOG_DIR/RUN_NAME-<worker hostname>.log   (and REMOTE_LOG_DIR/latest.log links to it)
on each worker. A previous run of the same RUN_NAME still alive on a worker is stopped first, so
re-running the same command after a crash or preemption restarts it cleanly; the training
command resumes from the last checkpoint in its --workdir. Stream the logs with launch/logs.sh.

Options:
  --env KEY=VALUE      export KEY=VALUE on the workers (repeatable; e.g. XLA flags)
  --pass-env KEY       export KEY with its value from this shell (repeatable)
  --run-name NAME      names the log and pid files [RUN_NAME, default train]
  --foreground         run attached instead: output streams back, ends with the command
  --stop               stop the detached run RUN_NAME on every worker, and exit

Every worker must run the same program: JAX finds the other workers (and, with multislice, the
other slices) through the TPU metadata, so no coordinator flags are needed.

Remote paths (expanded on the worker): REMOTE_REPO_DIR=${REMOTE_REPO_DIR}
  REMOTE_VENV=${REMOTE_VENV}  REMOTE_LOG_DIR=${REMOTE_LOG_DIR}

${COMMON_OPTIONS_HELP}

Example:
  launch/run.sh --name hope-760m --zone us-east5-a -- \\
      python -m experiments.pretrain --config=hope_760m --workdir=gs://BUCKET/runs/hope_760m
EOF
}

RUN_NAME=${RUN_NAME:-train}
FOREGROUND=0
STOP=0
ENV_ASSIGNMENTS=()
USER_CMD=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --env | --env=*)
      take_value "$@"; shift "$OPT_SHIFT"
      [[ $OPT_VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env '$OPT_VALUE': expected KEY=VALUE"
      ENV_ASSIGNMENTS+=("$OPT_VALUE") ;;
    --pass-env | --pass-env=*)
      take_value "$@"; shift "$OPT_SHIFT"
      [[ $OPT_VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "bad --pass-env '$OPT_VALUE': expected a variable name"
      [[ -v $OPT_VALUE ]] || die "--pass-env $OPT_VALUE: it is not set in this shell"
      ENV_ASSIGNMENTS+=("${OPT_VALUE}=${!OPT_VALUE}") ;;
    --run-name | --run-name=*) take_value "$@"; RUN_NAME=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --foreground) FOREGROUND=1; shift ;;
    --stop) STOP=1; shift ;;
    --) shift; USER_CMD=("$@"); break ;;
    *) if parse_common_option "$@"; then shift "$OPT_SHIFT"; else unknown_option "$1"; fi ;;
  esac
done
check_common
[[ $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad --run-name '$RUN_NAME'"
if [[ $STOP == 0 ]]; then
  ((${#USER_CMD[@]})) || die "missing the command to run: put it after '--' (see --help)"
fi

PIDFILE="${REMOTE_LOG_DIR}/${RUN_NAME}.pid"
# Stops the process group of a previous run (started by setsid, so pid == pgid): SIGTERM, up to
# 120 s for the trainer to finish a checkpoint save, then SIGKILL.
STOP_SCRIPT="if [ -f \"${PIDFILE}\" ] && kill -0 \"\$(cat \"${PIDFILE}\")\" 2>/dev/null; then
  echo \"\$(hostname): stopping ${RUN_NAME} (pid \$(cat \"${PIDFILE}\"))\"
  kill -TERM -- \"-\$(cat \"${PIDFILE}\")\" || true
  for _ in \$(seq 240); do kill -0 \"\$(cat \"${PIDFILE}\")\" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- \"-\$(cat \"${PIDFILE}\")\" 2>/dev/null || true
  rm -f /tmp/libtpu_lockfile 2>/dev/null || true
fi
rm -f \"${PIDFILE}\""

if [[ $STOP == 1 ]]; then
  ssh_all_cmd "set -uo pipefail
${STOP_SCRIPT}"
  run "${SSH_CMD[@]}"
  exit 0
fi

ENV_LINES=""
for assignment in "${ENV_ASSIGNMENTS[@]}"; do
  ENV_LINES+="export ${assignment%%=*}=$(quote "${assignment#*=}")"$'\n'
done
COMMAND_LINE=$(join_quoted "${USER_CMD[@]}")

if [[ $FOREGROUND == 1 ]]; then
  REMOTE_SCRIPT="set -euo pipefail
cd \"${REMOTE_REPO_DIR}\"
export PATH=\"${REMOTE_VENV}/bin:\$PATH\"
${ENV_LINES}${COMMAND_LINE}"
else
  REMOTE_SCRIPT="set -uo pipefail
mkdir -p \"${REMOTE_LOG_DIR}\"
${STOP_SCRIPT}
log=\"${REMOTE_LOG_DIR}/${RUN_NAME}-\$(hostname).log\"
ln -sfn \"\$log\" \"${REMOTE_LOG_DIR}/latest.log\"
cd \"${REMOTE_REPO_DIR}\"
export PATH=\"${REMOTE_VENV}/bin:\$PATH\"
${ENV_LINES}nohup setsid bash -c $(quote "$COMMAND_LINE") >>\"\$log\" 2>&1 </dev/null &
echo \$! >\"${PIDFILE}\"
echo \"\$(hostname): started ${RUN_NAME} (pid \$!), log \$log\""
fi

ssh_all_cmd "$REMOTE_SCRIPT"
run "${SSH_CMD[@]}"
if [[ $DRY_RUN == 0 && $FOREGROUND == 0 ]]; then
  info "started; follow it with: launch/logs.sh --name ${TPU_NAME} --zone ${ZONE} --num-slices ${NUM_SLICES} --follow"
fi
