#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Multislice front end: the other scripts with --num-slices N, plus a check of the MEGASCALE setup.
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<USAGE
Usage: launch/multislice.sh --num-slices N SUBCOMMAND [options of that script]

SUBCOMMAND is create | setup | run | logs | status | delete, and runs launch/SUBCOMMAND.sh with
--num-slices N (N >= 2), or megascale-env, which prints the MEGASCALE_* settings every worker
got. Example, two v5e-256 slices joined over the data-center network (DCN):

  launch/multislice.sh --num-slices 2 create --name hope-ms --zone us-east5-b --accelerator v5e-256 --mode spot
  launch/multislice.sh --num-slices 2 setup  --name hope-ms --zone us-east5-b
  launch/multislice.sh --num-slices 2 run    --name hope-ms --zone us-east5-b -- \\
      python -m experiments.pretrain --config=hope_760m --workdir=gs://BUCKET/runs/hope_760m_ms

How the slices find each other: a multislice queued resource (--node-count N) gives its nodes
NAME-0 .. NAME-(N-1) the MEGASCALE_COORDINATOR_ADDRESS / MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID
/ MEGASCALE_PORT settings through the TPU runtime metadata (tpu-env); libtpu reads them and
jax.distributed.initialize() needs no arguments. So no MEGASCALE variable is set by these
scripts. jax then sees all slices as one set of devices, each with a slice_index, and the mesh
puts the dcn_* parallelism (by default dcn_data_parallelism=-1: data parallel across slices) on
the slice axis. Slices made one by one (not one queued resource) do not get these settings;
recreate them as one queued resource instead. All ssh/scp go through
'gcloud compute tpus queued-resources ssh|scp NAME --node=all --worker=all'.

Options:
  --num-slices N       number of slices, >= 2 [NUM_SLICES]
  -h, --help           this message
USAGE
}

SUB=""
ARGS=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --num-slices | --num-slices=*) take_value "$@"; NUM_SLICES=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    create | setup | run | logs | status | delete | megascale-env) SUB=$1; shift; ARGS=("$@"); break ;;
    *) die "expected --num-slices N and then a subcommand (create, setup, run, logs, status, delete, megascale-env), not '$1'" ;;
  esac
done
[[ -n $SUB ]] || die "missing subcommand: create, setup, run, logs, status, delete or megascale-env (see --help)"
if ! [[ $NUM_SLICES =~ ^[0-9]+$ ]] || ((NUM_SLICES < 2)); then
  die "multislice needs --num-slices N with N >= 2 (got '${NUM_SLICES}'); for one slice use launch/${SUB}.sh"
fi

if [[ $SUB != megascale-env ]]; then
  exec "${LAUNCH_DIR}/${SUB}.sh" --num-slices "$NUM_SLICES" "${ARGS[@]}"
fi

set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    *) if parse_common_option "$@"; then shift "$OPT_SHIFT"; else unknown_option "$1"; fi ;;
  esac
done
check_common
# shellcheck disable=SC2016  # expanded on the workers
ssh_all_cmd 'echo "$(hostname): $(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/tpu-env | grep MEGASCALE | tr "\n" " ")"'
run "${SSH_CMD[@]}"
