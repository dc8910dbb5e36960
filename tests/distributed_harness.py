"""Run by the distributed tests under torchrun (or alone, as the one-process reference). Writes JSON.

harness.py train OUT key=value...   5 steps on fixed global batches, each rank training the samples the
                                    planner gives its unit; records losses, grad norms, the plan's
                                    micro-batch counts, and (OUT.pt) the final weights and EMA
harness.py attention OUT SP         Ulysses attention over a mixed-length packed stream vs one process
harness.py reload OUT CONFIG CHECKPOINT key=value...
                                    load a checkpoint onto this layout, save it again into OUT as loaded
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)

from pixelflow.config import load_config  # noqa: E402
from pixelflow.data.planner import plan_settings, plan_step  # noqa: E402
from pixelflow.parallel.world import init_world, shutdown  # noqa: E402
from pixelflow.train.batches import UnitBatch  # noqa: E402
from pixelflow.train.engines import build_engine  # noqa: E402
from pixelflow.train.metrics import LossWindow  # noqa: E402
from pixelflow.train.step import StepRunner  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "run_dir=unused",
    "data.path=unused",
    "data.resolution=32",
    "model.depth=2",
    "model.num_heads=4",
    "model.head_dim=8",
    "train.global_batch=8",
    "train.lr=1e-3",
    "train.warmup_steps=0",
    "train.lr_schedule=constant",
    "data.expand_ratio=1.125",
    "train.steps=5",
]


def global_batch(step: int, size: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randint(0, 256, (size, 3, resolution, resolution), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 16, (size,), generator=generator)


def full_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Plain tensors from a state dict of DTensor shards or tensors (collective under FSDP)."""
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu() for name, t in state.items()}


def train(out: Path, overrides: list[str]) -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY + overrides)
    world = init_world(cfg, "cpu")
    engine = build_engine(cfg, world)
    runner = StepRunner(cfg, world, engine)
    settings = plan_settings(cfg, world.dp_size)
    losses, norms, micro_counts = [], [], []
    for step in range(1, cfg.train.steps + 1):
        images, labels = global_batch(step, cfg.train.global_batch, cfg.data.resolution)
        plan = plan_step(settings, step)
        mine = torch.from_numpy(plan.samples_of(world.dp_rank))
        window = LossWindow(cfg.cascade.stages, world, cfg.train.global_batch)
        window.add(runner.run(UnitBatch(step, plan, images[mine], labels[mine])), plan)
        record = window.summary(step, engine.last_lr)
        losses.append(record["loss"])
        norms.append(record["grad_norm"])
        micro_counts.append(plan.num_micro)
    weights = full_tensors(engine.checkpoint_parts()["model"].state_dict())
    ema = full_tensors(engine.checkpoint_parts()["ema"].state_dict())
    if world.is_main:
        torch.save({"model": weights, "ema": ema}, out.with_suffix(".pt"))
        out.write_text(json.dumps({"losses": losses, "grad_norms": norms, "micro_batches": micro_counts}))
    shutdown(world)


def attention(out: Path, sp: int) -> None:
    """Sequences of 64..4096 tokens (sides 8..64) and two non-square grids, unsorted; compares output and
    input grads."""
    import torch.distributed as dist

    from pixelflow.model import PackedLayout
    from pixelflow.model.attention import SdpaRunsAttention, StreamContext
    from pixelflow.model.embeddings import rope_table
    from pixelflow.model.layout import stream_pieces
    from pixelflow.parallel.ulysses import UlyssesAttention, sp_slice

    cfg = load_config(REPO / "configs" / "demo.yaml", TINY + [f"parallel.sp={sp}", "parallel.dp_shard=1"])
    world = init_world(cfg, "cpu")
    layout = PackedLayout.from_grids([(16, 16), (64, 64), (6, 20), (8, 8), (32, 32), (20, 6), (8, 8), (16, 16), (1, 1)])
    heads, dim = 4, 8
    generator = torch.Generator().manual_seed(0)
    q, k, v, upstream = (torch.randn(layout.num_tokens, heads, dim, generator=generator) for _ in range(4))
    upstream = upstream.reshape(layout.num_tokens, heads * dim)

    def context(start, stop):
        rope = {grid: rope_table(grid, dim) for grid in set(layout.grids)}
        return StreamContext(
            layout, stream_pieces(layout, start, stop), layout.sequence_of_token(), layout.cu_seqlens(), rope
        )

    def pad(t, start, stop):
        part = t[start:stop]
        return torch.cat([part, part.new_zeros(stop - start - part.shape[0], *part.shape[1:])])

    start, stop = sp_slice(layout.num_tokens, world.sp_rank, world.sp)
    local = [pad(t, start, stop).requires_grad_(True) for t in (q, k, v)]
    out_local = UlyssesAttention(SdpaRunsAttention(), world.sp_group, world.sp)(*local, context(start, stop))
    (out_local * pad(upstream, start, stop)).sum().backward()
    pieces = [out_local.detach()] + [t.grad for t in local]
    gathered = []
    for piece in pieces:
        parts = [torch.empty_like(piece) for _ in range(world.sp)]
        dist.all_gather(parts, piece)
        gathered.append(torch.cat(parts)[: layout.num_tokens])
    if world.is_main:
        full = [t.clone().requires_grad_(True) for t in (q, k, v)]
        reference = SdpaRunsAttention()(*full, context(0, layout.num_tokens))
        (reference * upstream).sum().backward()
        expected = [reference.detach()] + [t.grad for t in full]
        diffs = [(a.reshape(b.shape) - b).abs().max().item() for a, b in zip(gathered, expected)]
        out.write_text(json.dumps({"max_abs_diff": diffs, "tokens": layout.num_tokens}))
    shutdown(world)


def reload(out: Path, config: str, checkpoint: str, overrides: list[str]) -> None:
    from pixelflow.train.checkpoint import Checkpointer
    from pixelflow.train.trainer import TrainProgress
    from pixelflow.weights import resolve_source

    cfg = load_config(config, overrides)
    world = init_world(cfg, "cpu")
    engine = build_engine(cfg, world)
    parts = {**engine.checkpoint_parts(), "train": TrainProgress(world)}
    checkpointer = Checkpointer(out, cfg.checkpoint, world, cfg)
    checkpointer.load(resolve_source(Path(checkpoint)), parts)
    checkpointer.save(parts["train"].step, parts, blocking=True)
    checkpointer.close()
    shutdown(world)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mode, target = sys.argv[1], Path(sys.argv[2])
    if mode == "train":
        train(target, sys.argv[3:])
    elif mode == "reload":
        reload(target, sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        attention(target, int(sys.argv[3]))
