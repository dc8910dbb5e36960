#!/usr/bin/env bash
# Wheels the GPU image (Python 3.12, torch 2.11 + triton, transformers, safetensors, pillow, numpy) lacks,
# downloaded here into .whl/ (git-ignored) for the device command to carry; at most 64 MiB travel in all.
#   bash benchmarks/gpu_wheels.sh && du -sh .whl
set -euo pipefail
rm -rf .whl && mkdir -p .whl
PY=${PY:-.venv/bin/python}
fetch() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .whl "$@"
}
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
pinned() { for name in "$@"; do echo "$name==$(version "$name")"; done; }  # the versions tests ran here
fetch $(pinned omegaconf webdataset braceexpand megatron-core) torchao
# source distributions only: pure-Python wheels built here (omegaconf's parser runtime, DeepSpeed)
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)" \
  "deepspeed==$(version deepspeed)"
fetch $(pinned hjson pydantic pydantic-core annotated-types typing-inspection py-cpuinfo)
du -sh .whl
