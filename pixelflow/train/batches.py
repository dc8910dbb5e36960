"""The data side of training behind one seam: `Batches` owns this rank's stream of shares, the step plan,
the lane rule, the exchange that moves each sample to the rank that trains it, and the text conditioner,
and yields one `UnitBatch` per step. Its state (every lane's cursor) is the data part of a checkpoint.

The global batch of a step is a function of (seed, step, sources) only, and the plan decides which unit
trains which sample, so the same step trains the same samples on any layout (see data/mixture.py and
data/planner.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from pixelflow.config import Config
from pixelflow.data.exchange import exchange
from pixelflow.data.loader import DataStream, lane_reader, merge_states
from pixelflow.data.planner import StepPlan, plan_settings, plan_step
from pixelflow.parallel.world import World
from pixelflow.train.signals import signal_numbers
from pixelflow.train.text_conditioning import TextConditioner, UnitText

T = TypeVar("T")


@dataclass
class UnitBatch:
    """One step's samples for this rank's unit: `plan.samples_of(unit)` in that order, on the device."""

    step: int
    plan: StepPlan
    images: torch.Tensor  # (n, 3, R, R) uint8
    labels: torch.Tensor  # (n,) int64, -1 = unlabelled
    text: UnitText | None = None  # caption embeddings, for text models
    keys: tuple[str, ...] = ()  # the keys this data rank read for the step (train.log_sample_keys)
    sources: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (B,) every slot's source
    wait_s: float = 0.0  # blocked on the loader and the exchange


class Batches:
    def __init__(self, cfg: Config, world: World, *, state: dict | None, first_step: int):
        self.world, self.step = world, first_step - 1
        self.conditioner = TextConditioner(cfg, world) if cfg.model.text_dim else None
        self.stream = open_stream(cfg, world, state, first_step)
        self.settings = {r: plan_settings(cfg, world.dp_size, r) for r in cfg.data.resolutions}  # by crop size
        self.data = cfg.data
        dp_mesh = world.dp_mesh
        self.group = dp_mesh.get_group() if dp_mesh is not None and world.dp_size > 1 else None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> UnitBatch:
        waiting = time.perf_counter()
        share = next(self.stream)
        self.step += 1
        plan = plan_step(self.settings[self.data.resolution_at(self.step)], self.step)
        readers = lane_reader(share.batch_lanes, self.world.dp_size)
        world, with_text = self.world, self.conditioner is not None
        images, labels, payloads = exchange(
            share, plan, readers, world.dp_rank, self.group, world.device, with_text, world.control
        )
        waited = time.perf_counter() - waiting
        text = self.conditioner.unit(payloads) if self.conditioner is not None else None
        return UnitBatch(self.step, plan, images, labels, text, tuple(share.keys), share.batch_sources, waited)

    def state_dict(self) -> dict:
        """Every lane's cursor (collective: the lanes are spread over the data ranks)."""
        return merge_states(gather(self.world, self.stream.state_dict()))

    def close(self) -> None:
        self.stream.close()


def gather(world: World, value: T) -> list[T]:
    """Every rank's value, in rank order (collective)."""
    if not world.distributed:
        return [value]
    out: list = [None] * world.size
    dist.all_gather_object(out, value, group=world.control)
    return out


def open_stream(cfg: Config, world: World, state: dict | None, first_step: int) -> DataStream:
    """This data rank's share of every global batch from `first_step` on, continuing from a checkpoint's lane
    cursors when given."""
    return DataStream(
        cfg.data,
        global_batch=cfg.train.global_batch,
        seed=cfg.seed,
        rank=world.dp_rank,
        world_size=world.dp_size,
        state=state,
        pin_memory=world.device.type == "cuda",
        ignore_signals=tuple(signal_numbers(cfg.train.stop_signals)),
        num_classes=cfg.model.num_classes,
        first_step=first_step,
        text=text_payload(cfg),
        embeddings=cfg.text.embeddings,
        text_dim=cfg.model.text_dim or 0,
    )


def text_payload(cfg: Config) -> str:
    """What travels with each image: nothing (class models), its caption, or its precomputed embedding."""
    if not cfg.model.text_dim:
        return ""
    return "captions" if cfg.text.mode == "online" else "embeddings"
