"""Sampling throughput: images/s for given Euler steps per stage, CFG and batch.

Random weights unless --checkpoint is given (speed does not depend on the values).

    python benchmarks/sample.py --config configs/pixelflow_xl_c2i_256.yaml --batch 8 --steps 4 --cfg 2.4
Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_name, emit, peak_memory_gib, reset_peak_memory, timed  # noqa: E402
from pixelflow.config import load_config  # noqa: E402
from pixelflow.generate import generate, load_for_sampling, sampling_dtype  # noqa: E402
from pixelflow.model import PixelFlowTransformer  # noqa: E402
from pixelflow.model.attention import set_attention_backend  # noqa: E402
from pixelflow.parallel.parallelize import apply_compile  # noqa: E402
from pixelflow.parallel.world import resolve_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pixelflow_xl_c2i_256.yaml")
    parser.add_argument("--checkpoint", help="sample real weights from this checkpoint instead")
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, nargs="+", default=[4], help="Euler steps per stage")
    parser.add_argument("--cfg", type=float, default=2.4)
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", default="none", help="none | default | reduce-overhead (CUDA graphs) | ...")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = sampling_dtype(device)
    if args.checkpoint:
        model, cfg = load_for_sampling(args.checkpoint, "ema", device, dtype)
    else:
        cfg = load_config(args.config, ["run_dir=unused", "data.path=unused", "train.steps=1", *args.overrides])
        model = PixelFlowTransformer(cfg.model).to(device=device, dtype=dtype).eval()
        set_attention_backend(model, cfg.model.attention, device.type)
    if args.compile != "none":
        apply_compile(model, args.compile)
    for batch in args.batch:
        for steps in args.steps:
            labels = [i % cfg.model.num_classes for i in range(batch)] if cfg.model.num_classes else None
            run = functools.partial(sample_once, model, cfg, labels, batch, steps, args.cfg, device, args.solver)
            run()  # warm-up: kernels, RoPE tables, layouts, compiled graphs
            if args.compile != "none":
                run()  # CUDA graphs are recorded on the second call
            reset_peak_memory(device)
            seconds = timed(device, run, args.repeats)
            peak = peak_memory_gib(device)
            emit(
                {
                    "bench": "sample",
                    "device": device_name(device),
                    "config": args.config,
                    "batch": batch,
                    "steps_per_stage": steps,
                    "cfg": args.cfg,
                    "solver": args.solver,
                    "compile": args.compile,
                    "dtype": str(dtype),
                    "seconds": round(seconds, 4),
                    "images_per_s": round(batch / seconds, 3),
                    "peak_mem_gib": None if peak is None else round(peak, 2),
                }
            )


def sample_once(model, cfg, labels, batch, steps, scale, device, solver) -> None:
    with torch.inference_mode():
        generate(model, cfg, labels, batch, 0, steps, scale, device, solver)


if __name__ == "__main__":
    main()
