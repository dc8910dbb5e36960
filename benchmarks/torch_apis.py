"""The young or private torch APIs this project calls, checked on the torch at hand (the GPU image's may be
older than the one tests run on): one JSON line; exit status 1 when one the trainer needs is missing.

    python benchmarks/torch_apis.py
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit  # noqa: E402

STAGING_OPTIONS = {"use_pinned_memory", "use_shared_memory", "use_async_staging", "use_non_blocking_copy"}
OPTIONAL = ["omegaconf", "webdataset", "megatron.core", "deepspeed", "torchao.float8", "transformers", "s3fs"]


def problems() -> list[str]:
    found = []
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        fields = {f.name for f in dataclasses.fields(StagingOptions)}
        if not STAGING_OPTIONS <= fields:
            found.append(f"StagingOptions lacks {sorted(STAGING_OPTIONS - fields)} (async saves fall back to sync)")
        if not hasattr(DefaultStager, "stage"):
            found.append("DefaultStager has no stage()")
    except ImportError as exc:
        found.append(f"torch.distributed.checkpoint.staging: {exc} (async saves fall back to sync)")
    from torch.distributed.device_mesh import DeviceMesh

    for name in ("_flatten", "_unflatten"):
        if not hasattr(DeviceMesh, name):
            found.append(f"DeviceMesh.{name} is missing (the mesh views)")
    if "mesh_dim_names" not in inspect.signature(DeviceMesh._unflatten).parameters:
        found.append("DeviceMesh._unflatten takes no mesh_dim_names")
    for module, name in [
        ("torch.distributed.fsdp", "fully_shard"),
        ("torch.distributed.fsdp", "MixedPrecisionPolicy"),
        ("torch.distributed.checkpoint.state_dict", "get_model_state_dict"),
        ("torch.nn.attention.flex_attention", "flex_attention"),
        ("torch._dynamo.utils", "counters"),
    ]:
        if not hasattr(importlib.import_module(module), name):
            found.append(f"{module}.{name} is missing")
    return found


def main() -> int:
    missing = []
    for name in OPTIONAL:
        try:
            importlib.import_module(name)
        except Exception as exc:  # not installed, or built for another torch
            missing.append(f"{name}: {type(exc).__name__}: {str(exc)[:120]}")
    try:
        importlib.import_module("torch.nn.attention.varlen")
        varlen = True
    except ImportError:
        varlen = False
    found = problems()
    record = {
        "bench": "torch_apis",
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
        "varlen_attn": varlen,
        "problems": found,
        "missing_packages": missing,
    }
    emit(record)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
