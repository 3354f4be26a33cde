#!/usr/bin/env bash
# One prepared accelerator check, about thirteen minutes on one GPU: the training-step table at the width
# of hope_340m (d_model 1024, memory heads 8 x 128, CMS 4 x 320; 4 layers so that each row compiles
# in under two minutes) against Transformer++ and Titans of the same parameter count at T = 2048, the
# memory core's chunked form against its token-by-token reference at HOPE's head width (one sequence:
# at 8 the reference's per-token residuals ask 81 GiB), and the Pallas kernels of the chunked form
# against the XLA one at T = 4096 (benchmarks/kernels.py: the gated delta rule and Titans' linear and
# MLP memories; Triton on GPU). README "On one GPU" has its figures.
#
#   bash benchmarks/device_check.sh [OUT_DIR [PART...]]   # OUT_DIR/*.txt, train_step.json
#
# PART: devices, train_step, memory_ops, kernels (all by default). Where one call may not run
# thirteen minutes, run train_step in one call and the other parts in a second.
#
# Each part runs under its own time limit and a failed part does not stop the next, so one call of a
# short lease returns every part that ran. A machine without network access needs the packages that
# its image lacks as wheels in .device_wheels/ (made here by `pip download --no-deps --python-version
# 3.12 ... grain array-record ml-collections tensorboardX portpicker importlib_resources`); they are
# installed with --no-deps beside the image's packages. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out="${1:-device_check_out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
# The benchmarks default to the CPU where JAX_PLATFORMS is unset; here they must find the GPU or fail.
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
if [ -d .device_wheels ]; then
  "$py" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/device_site .device_wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/device_site"
fi

parts=("${@:2}")
part() {  # part NAME SECONDS COMMAND...: runs COMMAND with its output in OUT/NAME.txt, if NAME was asked
  local name=$1 limit=$2
  shift 2
  if [ ${#parts[@]} -gt 0 ] && [[ " ${parts[*]} " != *" $name "* ]]; then return; fi
  echo "== $name (limit ${limit}s, ${SECONDS}s into the check)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]}, ${SECONDS}s into the check"
}

# hope_340m's width at 4 layers, with the mesh one device holds
shape=(--base=hope_340m --tokens_per_step=16384 --steps=5 --override=model.num_layers=4
  --override=train.grad_accum_steps=1 --override=mesh.ici_tensor_parallelism=1
  --override=mesh.ici_fsdp_parallelism=-1)

part devices 30 "$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"
part train_step 420 "$py" -m benchmarks.train_step "${shape[@]}" --lengths=2048 \
  --models=transformer,titans,hope_none,hope_ntp --json="$out/train_step.json"
part memory_ops 45 "$py" -m benchmarks.memory_ops --lengths=2048 --batch=1 --heads=8
part kernels 300 "$py" -m benchmarks.kernels --lengths=4096 --head_dims=64,128 --reps=3
