#!/usr/bin/env bash
# The one device command (at most 8 minutes with installs): carried wheels from .whl/ (made here by
# benchmarks/gpu_wheels.sh), then benchmarks/gpu_checks.py, which writes $OUT/results.jsonl and prints a
# summary. From the repository root on the GPU machine:
#   bash benchmarks/gpu_checks.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
OUT="${OUT:-/tmp/gpu_checks}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 450 python3 benchmarks/gpu_checks.py --out "$OUT" --budget-s 430 "$@"
