"""Training-step throughput: img/s, TFLOP/s, MFU and peak memory over a sweep of batch sizes.

Synthetic uint8 images go through the trainer's own step (cascade pairs on the device, forward, backward,
AdamW, EMA). FLOPs count 3 x depth x (24 d^2 L + 4 d L^2) per sample of L tokens at its planned stage.

    python benchmarks/train_step.py --config configs/pixelflow_xl_c2i_256.yaml --batches 16 32 64 --micro 16 \
        --compile --peak-tflops 790
    torchrun --nproc_per_node 1 benchmarks/train_step.py --batches 16 --micro 16 --compile   # FSDP2, world size 1
    torchrun --nproc_per_node 1 benchmarks/train_step.py --engine deepspeed --batches 16      # DeepSpeed ZeRO-3
Prints one JSON line per configuration (from rank 0).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_name, emit, peak_memory_gib, reset_peak_memory, timed  # noqa: E402
from pixelflow.cascade import CascadeSchedule  # noqa: E402
from pixelflow.config import load_config  # noqa: E402
from pixelflow.data.planner import plan_settings, plan_step  # noqa: E402
from pixelflow.parallel.world import init_world  # noqa: E402
from pixelflow.train.engine import build_engine  # noqa: E402
from pixelflow.train.trainer import train_step  # noqa: E402


def step_flops(cfg, schedule: CascadeSchedule, stages: list[int]) -> float:
    d, depth = cfg.model.num_heads * cfg.model.head_dim, cfg.model.depth
    total = 0.0
    for stage in stages:
        tokens = (schedule.side(cfg.data.resolution, stage) // cfg.model.patch_size) ** 2
        total += 3 * depth * (24 * d * d * tokens + 4 * d * tokens * tokens)
    return total


def measure(args: argparse.Namespace, batch_size: int) -> dict:
    micro = args.micro
    cfg = load_config(
        args.config,
        [
            "run_dir=unused",
            "data.path=unused",
            f"engine={args.engine}",
            f"train.global_batch={batch_size}",
            f"train.micro_batch={micro}",
            f"train.device={args.device}",
            f"parallel.compile={args.compile}",
            f"parallel.activation_checkpointing={args.ac}",
            f"model.attention={args.attention}",
            *args.overrides,
        ],
    )
    world = init_world(cfg, cfg.train.device)
    device = world.device
    record = {
        "bench": "train_step",
        "device": device_name(device),
        "config": args.config,
        "engine": cfg.engine if world.distributed else "plain",
        "world_size": world.size,
        "batch": batch_size,
        "micro": micro or batch_size,
        "compile": args.compile,
        "ac": args.ac,
        "attention": args.attention,
    }
    engine = build_engine(cfg, world)
    schedule = CascadeSchedule.build(cfg.cascade.stages, cfg.cascade.gamma, cfg.cascade.num_train_timesteps)
    side = cfg.data.resolution
    images = torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8, device=device)
    labels = torch.randint(0, max(cfg.model.num_classes, 1), (batch_size,), device=device)
    settings = plan_settings(cfg, world.dp_size)
    steps = iter(range(1, 10**9))

    def one_step() -> None:
        step = next(steps)
        plan = plan_step(settings, step)
        mine = torch.from_numpy(plan.samples_of(world.dp_rank)).to(device)
        train_step(engine, images[mine], labels[mine], plan, step, cfg, schedule, world)

    try:
        timed(device, one_step, args.warmup)
        reset_peak_memory(device)
        seconds = timed(device, one_step, args.steps)
    except torch.OutOfMemoryError:
        return {**record, "error": "out of memory"}
    tflops = step_flops(cfg, schedule, plan_step(settings, 1).stages.tolist()) / seconds / 1e12
    peak = peak_memory_gib(device)
    return {
        **record,
        "step_s": round(seconds, 4),
        "img_per_s": round(batch_size / seconds, 2),
        "tflops": round(tflops, 2),
        "mfu": round(tflops / args.peak_tflops, 4) if args.peak_tflops else None,
        "peak_mem_gib": None if peak is None else round(peak, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pixelflow_xl_c2i_256.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64], help="images per step")
    parser.add_argument(
        "--micro", type=int, default=0, help="full-resolution images' worth of tokens per forward/backward (0 = all)"
    )
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--ac", default="none", help="activation checkpointing: none | full | every_<k>")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak for MFU (0 = no MFU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--engine", default="fsdp", help="fsdp (plain on one process, FSDP2 under torchrun) | deepspeed"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    for batch_size in args.batches:
        record = measure(args, batch_size)
        if int(os.environ.get("RANK", "0")) == 0:
            emit(record)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
