"""Checkpoint save cost: how long a save holds the step loop, synchronous vs asynchronous, and bytes per rank.

The state is the trainer's own (model, EMA, AdamW moments, LR schedule, data cursors) after one optimizer
step, saved through the trainer's Checkpointer into a scratch run directory. "blocking" is what the step
loop waits for; "until committed" adds the background write, checksums and commit of an async save.

    python benchmarks/checkpoint.py --dir /tmp/ckpt_bench                          # ~130M parameters, CPU
    python benchmarks/checkpoint.py --config configs/pixelflow_xl_c2i_256.yaml --dir /scratch/ckpt   # XL, GPU
    torchrun --nproc_per_node 2 benchmarks/checkpoint.py --dir /tmp/ckpt_bench    # FSDP2, bytes per rank
Prints one JSON line per mode (from rank 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_name, emit, synchronize  # noqa: E402
from pixelflow.config import load_config  # noqa: E402
from pixelflow.data.planner import plan_settings, plan_step  # noqa: E402
from pixelflow.parallel.world import init_world, shutdown  # noqa: E402
from pixelflow.train.batches import UnitBatch  # noqa: E402
from pixelflow.train.checkpoint import Checkpointer  # noqa: E402
from pixelflow.train.engines import build_engine  # noqa: E402
from pixelflow.train.step import StepRunner  # noqa: E402
from pixelflow.weights import step_dir  # noqa: E402

# ~130M parameters: 12 blocks of 768 (12 heads x 64)
CPU_MODEL = ["model.depth=12", "model.num_heads=12", "model.head_dim=64", "model.num_classes=1000"]


class FixedProgress:
    def state_dict(self) -> dict:
        return {"step": 1, "data": {"num_lanes": 1, "positions": [0]}}

    def load_state_dict(self, state: dict) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--dir", required=True, help="scratch directory (emptied) on the disk to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = ([] if "xl" in args.config else CPU_MODEL) + [
        f"run_dir={args.dir}",
        "data.path=unused",
        "data.resolution=32",
        "train.global_batch=2",
        "train.steps=1",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    world = init_world(cfg, cfg.train.device)
    engine = build_engine(cfg, world)
    plan = plan_step(plan_settings(cfg, world.dp_size), 1)
    local = len(plan.samples_of(world.dp_rank))
    side, device = cfg.data.resolution, world.device  # the step's inputs live where it runs
    images = torch.randint(0, 256, (local, 3, side, side), dtype=torch.uint8, device=device)
    StepRunner(cfg, world, engine).run(UnitBatch(1, plan, images, torch.zeros(local, dtype=torch.long, device=device)))
    parts = {**engine.checkpoint_parts(), "train": FixedProgress()}
    parameters = sum(p.numel() for p in engine.model.parameters())
    if world.distributed:  # parameters() are this rank's shards under FSDP2
        from torch.distributed.tensor import DTensor

        parameters = sum(
            p.full_tensor().numel() if isinstance(p, DTensor) else p.numel() for p in engine.model.parameters()
        )
    directory = Path(args.dir) / "checkpoints"
    if world.is_main:
        shutil.rmtree(args.dir, ignore_errors=True)
        directory.mkdir(parents=True)
    step = 0
    for mode in ("sync", "async"):
        cfg.checkpoint.async_save = mode == "async"
        cfg.checkpoint.keep = 1
        checkpointer = Checkpointer(directory, cfg.checkpoint, world, cfg)
        blocking, total = [], []
        for _ in range(args.repeats + 1):  # the first save warms up (allocates the staging buffers)
            step += 1
            synchronize(world.device)
            started = time.perf_counter()
            checkpointer.save(step, parts)
            held = checkpointer.last_blocking_s
            checkpointer.wait()
            blocking.append(held)
            total.append(time.perf_counter() - started)
        checkpointer.close()
        folder = step_dir(directory, step)
        mine = sum(p.stat().st_size for p in folder.glob(f"__{world.rank}_*.distcp"))
        everything = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        if world.is_main:
            emit(
                {
                    "bench": "checkpoint",
                    "device": device_name(world.device),
                    "mode": mode,
                    "ranks": world.size,
                    "parameters": parameters,
                    "blocking_s": round(min(blocking[1:]), 4),
                    "until_committed_s": round(min(total[1:]), 4),
                    "bytes_rank0": mine,
                    "bytes_total": everything,
                }
            )
    shutdown(world)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
