#!/usr/bin/env bash
# Every GPU check of this project in one pass (run on a CUDA machine from the repository root):
# backend agreement tests on CUDA, a short bf16 training + sampling run, then the sampling and
# training-step benchmarks on PixelFlow-XL/4 at 256 px. Prints JSON lines; a failing part does not stop
# the rest. Optional wheels for packages the machine lacks can be put in .whl/ (see docs/benchmarks.md).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
OUT="${OUT:-/tmp/gpu_checks}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
part() { echo "=== $1"; shift; timeout "$@" || echo "{\"part_failed\": \"$*\", \"rc\": $?}"; }

part "attention backends and model on CUDA" 120 python3 -m pytest -q -x tests/test_attention.py tests/test_model.py
part "bf16 training and sampling on CUDA" 90 bash -c '
  python3 -m data_tools synth /tmp/demo_data --count 512 --per-shard 64 &&
  python3 -m pixelflow train configs/demo.yaml run_dir=/tmp/demo_run data.path=/tmp/demo_data train.steps=200 \
      train.log_every=100 checkpoint.every=200 | tail -3 &&
  python3 -m pixelflow sample --checkpoint /tmp/demo_run --out '"$OUT"'/demo_grid.png --classes 0 5 10 15'
part "sampling, XL/4 256px" 90 python3 benchmarks/sample.py --batch 8 16 --steps 4 30 --cfg 2.4
part "train step, compiled, micro 16" 200 python3 benchmarks/train_step.py --batches 16 64 --micro 16 --compile \
    --steps 8 --peak-tflops 790
part "train step, eager" 80 python3 benchmarks/train_step.py --batches 16 --steps 6 --peak-tflops 790
part "train step, compiled, micro 32" 120 python3 benchmarks/train_step.py --batches 32 64 --micro 32 --compile \
    --steps 6 --peak-tflops 790
