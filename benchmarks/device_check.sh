#!/usr/bin/env bash
# One prepared accelerator check, a few minutes on one GPU: the training-step table at the width of
# hope_340m (d_model 1024, memory heads 8 x 128, CMS 4 x 320; 4 layers so that each row compiles in
# under a minute) against Transformer++ and Titans of the same parameter count, at T = 2048 and 4096,
# the memory core's chunked form against its token-by-token reference at HOPE's head width, and the
# Pallas kernels of the chunked form against the XLA one at T = 4096 (benchmarks/kernels.py: the
# gated delta rule and Titans' linear memory; Triton on GPU).
#
#   bash benchmarks/device_check.sh [OUT_DIR]   # OUT_DIR/{train_step,memory_ops}.{txt,json}, kernels.txt
#
# A machine without network access needs the packages that its image lacks as wheels in
# .device_wheels/ (made here by `pip download grain ml-collections tensorboardX -d .device_wheels`);
# they are installed with --no-deps before the run. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-device_check_out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
if [ -d .device_wheels ]; then
  "$py" -m pip install --quiet --no-deps .device_wheels/*.whl
fi
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$out/devices.txt"

"$py" -m benchmarks.train_step --base=hope_340m --lengths=2048,4096 --tokens_per_step=16384 \
  --models=transformer,titans,hope_none,hope_ntp --steps=10 \
  --override=model.num_layers=4 --override=train.grad_accum_steps=1 \
  --override=mesh.ici_tensor_parallelism=1 --override=mesh.ici_fsdp_parallelism=-1 \
  --json="$out/train_step.json" 2>&1 | tee "$out/train_step.txt"

"$py" -m benchmarks.memory_ops --lengths=2048,4096,8192 --batch=8 --heads=8 2>&1 | tee "$out/memory_ops.txt"
"$py" -m benchmarks.kernels --lengths=4096 --head_dims=64,128,256 --reps=3 2>&1 | tee "$out/kernels.txt"
