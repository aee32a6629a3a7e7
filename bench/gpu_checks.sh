#!/usr/bin/env bash
# What a GPU host shows that the CPU suite cannot, in one short run (8-9 minutes on
# an H200): the Triton kernels compiled and checked against the XLA reference
# (tests/test_kernels_gpu.py), attention forward+backward against cuDNN
# (bench/attention.py), and generation against HF `generate` on the same GPU
# (bench/generate.py, Qwen2.5-Math-1.5B's shapes in bfloat16, random weights).
#
#   bash bench/gpu_checks.sh [OUT_DIR]     # logs land in OUT_DIR (default gpu_checks/)
#
# Needs jax with CUDA, torch with CUDA, transformers, flax, optax, safetensors and
# pytest in the running python3; the repository root goes on PYTHONPATH. Each step
# has its own time limit, so one that hangs does not cost the others.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_checks}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" \
  2>&1 | tee -a "$out/gpu.txt"

timeout 420 python3 -m pytest -q -s -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 \
  | tee "$out/kernels_gpu.log"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 python3 bench/attention.py 2>&1 \
  | tee "$out/attention.log"
# JAX and torch share the GPU here: JAX takes half of its memory, not the default 75%.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 240 python3 bench/generate.py \
  --preset qwen2.5-math-1.5b --dtype bfloat16 --repeats 2 2>&1 | tee "$out/generate.log"
