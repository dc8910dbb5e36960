"""Training-step throughput: img/s, TFLOP/s, MFU and peak memory over a sweep of batch sizes.

Synthetic uint8 images go through the trainer's own step (cascade pairs on the device, forward, backward,
AdamW, EMA). FLOPs count 3 x depth x (24 d^2 L + 4 d L^2) per sample of L tokens at its planned stage.

`--micro N` is the baseline's setting: micro-batches of about N images of the step's stage mix (a token
budget of N x the mean tokens per image, so batch 64 at --micro 16 runs about 4 micro-batches as the
2026-11-28 line did); `--micro-tokens T` sets the trainer's own budget (train.micro_tokens) directly.
`--profile` adds one line of device time by op class (matmul, attention, norm, elementwise, copy,
communication, other) over a few profiled steps.

    python benchmarks/train_step.py --config configs/pixelflow_xl_c2i_256.yaml --batches 16 32 64 --micro 16 \
        --compile --peak-tflops 790
    torchrun --nproc_per_node 1 benchmarks/train_step.py --batches 16 --micro 16 --compile   # FSDP2, world size 1
    torchrun --nproc_per_node 1 benchmarks/train_step.py --engine deepspeed --batches 16      # DeepSpeed ZeRO-3
Prints one JSON line per configuration (from rank 0).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_name, emit, peak_memory_gib, reset_peak_memory, timed  # noqa: E402
from pixelflow.cascade import CascadeSchedule  # noqa: E402
from pixelflow.config import load_config  # noqa: E402
from pixelflow.data.planner import plan_settings, plan_step  # noqa: E402
from pixelflow.parallel.world import init_world  # noqa: E402
from pixelflow.train.batches import UnitBatch  # noqa: E402
from pixelflow.train.engines import build_engine  # noqa: E402
from pixelflow.train.step import StepRunner  # noqa: E402


def step_flops(cfg, schedule: CascadeSchedule, stages: list[int]) -> float:
    d, depth = cfg.model.num_heads * cfg.model.head_dim, cfg.model.depth
    total = 0.0
    for stage in stages:
        tokens = (schedule.side(cfg.data.resolution, stage) // cfg.model.patch_size) ** 2
        total += 3 * depth * (24 * d * d * tokens + 4 * d * tokens * tokens)
    return total


OP_CLASSES = [  # (class, pattern of profiler op names), first match wins
    ("communication", r"nccl|gloo|all_gather|reduce_scatter|all_reduce|all_to_all|c10d"),
    ("attention", r"attention|flash|sdpa|fmha|_efficient"),
    ("matmul", r"\bmm\b|addmm|bmm|matmul|linear|gemm|cutlass|sm90_xmma|nvjet"),
    ("norm", r"norm"),
    ("copy", r"copy|memcpy|memset|_to_copy|index|cat\b|gather|scatter"),
    ("elementwise", r"triton|elementwise|vectorized|mul|add|gelu|silu|exp|pow|where|fused"),
]


def op_class(name: str) -> str:
    lowered = name.lower()
    return next((cls for cls, pattern in OP_CLASSES if re.search(pattern, lowered)), "other")


def profile_summary(one_step, device: torch.device, steps: int = 3) -> dict:
    """Self device time (CPU time on CPU) per op class over `steps` steps, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        timed(device, one_step, steps)
    classes: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        if device.type == "cuda":
            micros = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            micros = event.self_cpu_time_total
        if micros <= 0:
            continue
        classes[op_class(event.key)] = classes.get(op_class(event.key), 0.0) + micros / 1000 / steps
        top.append((micros / 1000 / steps, event.key))
    total = sum(classes.values()) or 1.0
    return {
        "ms_per_step": {name: round(ms, 2) for name, ms in sorted(classes.items(), key=lambda kv: -kv[1])},
        "share": {name: round(ms / total, 3) for name, ms in classes.items()},
        "top_ops": [[name[:80], round(ms, 2)] for ms, name in sorted(top, reverse=True)[:8]],
    }


def measure(args: argparse.Namespace, batch_size: int) -> dict:
    cfg = load_config(
        args.config,
        [
            "run_dir=unused",
            "data.path=unused",
            f"engine={args.engine}",
            f"train.global_batch={batch_size}",
            f"train.micro_tokens={args.micro_tokens}",
            f"train.device={args.device}",
            f"parallel.compile={args.compile}",
            f"parallel.activation_checkpointing={args.ac}",
            f"model.attention={args.attention}",
            *args.overrides,
        ],
    )
    world = init_world(cfg, cfg.train.device)
    device = world.device
    if args.micro:  # N images of the step's mean stage mix per micro-batch
        whole = plan_step(plan_settings(cfg, world.dp_size), 1)
        budget = math.ceil(args.micro * whole.tokens() / batch_size)
        cfg.train.micro_tokens = max(budget, max(whole.settings.stage_tokens))  # a top-stage image fits
    settings = plan_settings(cfg, world.dp_size)
    record = {
        "bench": "train_step",
        "device": device_name(device),
        "config": args.config,
        "engine": cfg.engine if world.distributed else "plain",
        "world_size": world.size,
        "batch": batch_size,
        "micro": args.micro or None,
        "micro_tokens": cfg.train.micro_tokens or None,
        "micro_batches": plan_step(settings, 1).num_micro,
        "compile": args.compile,
        "ac": args.ac,
        "attention": args.attention,
    }
    engine = build_engine(cfg, world)
    runner = StepRunner(cfg, world, engine)
    schedule = runner.schedule
    side = cfg.data.resolution
    images = torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8, device=device)
    labels = torch.randint(0, max(cfg.model.num_classes, 1), (batch_size,), device=device)
    steps = iter(range(1, 10**9))

    def one_step() -> None:
        step = next(steps)
        plan = plan_step(settings, step)
        mine = torch.from_numpy(plan.samples_of(world.dp_rank)).to(device)
        runner.run(UnitBatch(step, plan, images[mine], labels[mine]))

    try:
        timed(device, one_step, args.warmup)
        reset_peak_memory(device)
        seconds = timed(device, one_step, args.steps)
    except torch.OutOfMemoryError:
        return {**record, "error": "out of memory"}
    tflops = step_flops(cfg, schedule, plan_step(settings, 1).stages.tolist()) / seconds / 1e12
    peak = peak_memory_gib(device)
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    if args.profile:
        record["profile"] = profile_summary(one_step, device)
    return {
        **record,
        "step_s": round(seconds, 4),
        "img_per_s": round(batch_size / seconds, 2),
        "tflops": round(tflops, 2),
        "mfu": round(tflops / args.peak_tflops, 4) if args.peak_tflops else None,
        "peak_mem_gib": None if peak is None else round(peak, 2),
        "peak_reserved_gib": None if reserved is None else round(reserved, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pixelflow_xl_c2i_256.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64], help="images per step")
    parser.add_argument(
        "--micro", type=int, default=0, help="images of the step's stage mix per forward/backward (0 = all)"
    )
    parser.add_argument("--micro-tokens", type=int, default=0, help="tokens per forward/backward (train.micro_tokens)")
    parser.add_argument("--profile", action="store_true", help="add device time by op class")
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
