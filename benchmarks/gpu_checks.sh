#!/usr/bin/env bash
# Every GPU check of this project in one pass (run on a CUDA machine from the repository root): the CUDA
# tests (attention kernels agree), a short FSDP2 training run with checkpoint and sampling through the real
# CLI (async checkpoint save on CUDA), then the benchmarks on PixelFlow-XL/4 at 256 px: plain compiled
# training, sampling, FSDP2, checkpoint save (sync vs async) and DeepSpeed ZeRO-3 at world size 1. Prints JSON lines; a failing part does not stop the rest. Wheels for
# packages the machine lacks can be put in .whl/ (see benchmarks/RESULTS.md).
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
SINGLE="python3 -m torch.distributed.run --nproc_per_node 1 --master_port 29577"  # a world of one: FSDP2 / ZeRO-3

part "attention kernels and model on CUDA" 90 python3 -m pytest -q -x tests/test_attention.py tests/test_model.py
part "FSDP2 training, checkpoint and sampling on CUDA" 75 bash -c '
  python3 -m data_tools synth /tmp/demo_data --count 512 --per-shard 64 >/dev/null &&
  python3 -m torch.distributed.run --nproc_per_node 1 --master_port 29578 -m pixelflow train configs/demo.yaml \
      run_dir=/tmp/demo_run data.path=/tmp/demo_data train.steps=200 train.log_every=100 checkpoint.every=200 \
      | grep step= &&
  python3 -m pixelflow sample --checkpoint /tmp/demo_run --out '"$OUT"'/demo_grid.png --classes 0 5 10 15'
part "train step, compiled, micro 16" 150 python3 benchmarks/train_step.py --batches 16 64 --micro 16 --compile \
    --steps 8 --peak-tflops 790
part "sampling, XL/4 256px" 60 python3 benchmarks/sample.py --batch 8 --steps 4 --cfg 2.4
part "train step, FSDP2 world size 1, compiled" 100 $SINGLE benchmarks/train_step.py --batches 16 --micro 16 --compile \
    --steps 8 --peak-tflops 790
part "checkpoint save XL/4, sync vs async (FSDP2 world size 1)" 150 $SINGLE benchmarks/checkpoint.py \
    --config configs/pixelflow_xl_c2i_256.yaml --dir /tmp/ckpt_xl --repeats 2
part "train step, DeepSpeed ZeRO-3 world size 1" 90 $SINGLE benchmarks/train_step.py --engine deepspeed --batches 16 \
    --steps 6 --peak-tflops 790
