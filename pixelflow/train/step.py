"""One optimizer step of this rank's unit (`StepRunner`), what it yields (`StepOutcome`, its `BusyTime`),
and the watch on non-finite steps. The runner is built once per run: the cascade schedule, the precision,
the null class and whether non-finite steps are skipped."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pixelflow.cascade import CascadeSchedule, build_training_batch, per_sequence_mse
from pixelflow.config import Config
from pixelflow.devices import to_device
from pixelflow.errors import NonFiniteError
from pixelflow.parallel.ulysses import shard_stream
from pixelflow.parallel.world import World
from pixelflow.train.batches import UnitBatch
from pixelflow.train.engine import Engine


class BusyTime:
    """A step's forward/backward time on this rank: the host clock on CPU; on a GPU a pair of CUDA events,
    read when the loss window is summarized (which syncs anyway), so the step itself never waits."""

    def __init__(self, device: torch.device):
        self.events = None
        if device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.started, self.ended = time.perf_counter(), 0.0

    def stop(self) -> BusyTime:
        if self.events is not None:
            self.events[1].record()
        self.ended = time.perf_counter()
        return self

    def seconds(self) -> float:
        if self.events is None:
            return self.ended - self.started
        self.events[1].synchronize()
        return self.events[0].elapsed_time(self.events[1]) / 1000


@dataclass
class StepOutcome:
    """What one rank's step produced, for the loss window."""

    per_sample: torch.Tensor  # (n,) this rank's share of each of its samples' loss
    stages: torch.Tensor  # (n,) their stages
    sources: torch.Tensor  # (n,) and their sources (data.sources; 0 for one dataset)
    grad_norm: torch.Tensor
    busy: BusyTime  # forward/backward time on this rank
    tokens: int  # tokens this rank ran, padding included
    padding: int  # padding tokens among them (SP slices, padding micro-batches)
    layouts: set = field(default_factory=set)  # the (layout, caption length) shapes run: a compiled graph each


class NonFiniteWatch:
    """The first step whose loss or gradient was not finite, kept on the device and read only where the
    loop syncs anyway (before a log line, a sample grid or a save, and at the end): a diverged run stops
    naming that step, with nothing of it saved, and no step waits for the device to find out."""

    def __init__(self, device: torch.device):
        self.first = torch.zeros((), dtype=torch.int64, device=device)
        self.norm = torch.zeros((), device=device)

    def add(self, step: int, grad_norm: torch.Tensor) -> None:
        grad_norm = grad_norm.to(self.norm)  # DeepSpeed's is a host number
        newly = (self.first == 0) & ~torch.isfinite(grad_norm)
        self.first = torch.where(newly, step, self.first)
        self.norm = torch.where(newly, grad_norm, self.norm)

    def check(self) -> None:
        step = int(self.first)
        if step:
            raise NonFiniteError(
                f"step {step}: the loss or gradient is not finite (grad norm {self.norm.item()}); stopped "
                f"without saving, the newest committed checkpoint is unchanged (train.nonfinite=skip_step "
                f"skips such steps instead)"
            )


def padding_micro_batch(cfg: Config, schedule: CascadeSchedule, device: torch.device, step: int):
    """A one-sample, lowest-stage micro-batch whose loss counts zero: keeps a unit with fewer samples than
    the plan's micro-batch count in step with the others' collectives."""
    resolution = cfg.data.resolution_at(step)
    images = torch.zeros((1, 3, resolution, resolution), dtype=torch.uint8, device=device)
    labels = torch.zeros(1, dtype=torch.int64, device=device)
    return build_training_batch(images, labels, [0], schedule, cfg.model.patch_size, cfg.seed, step, [-1])


class StepRunner:
    """One optimizer step of this rank's unit: the batch's images and labels (on the device) are the unit's
    samples, `plan.samples_of(unit)` in that order (and its text their captions' embeddings, for text
    models), trained in the plan's micro-batches.

    The step's loss is the mean over the global batch of the per-sample losses, however the batch was
    split: each rank backpropagates its samples' sum x gradient_ranks / batch (the ranks FSDP or DeepSpeed
    average gradients over); an SP group's ranks hold shares of their samples' losses that add up."""

    def __init__(self, cfg: Config, world: World, engine: Engine):
        self.cfg, self.world, self.engine = cfg, world, engine
        self.schedule = CascadeSchedule.build(cfg.cascade.stages, cfg.cascade.gamma, cfg.cascade.num_train_timesteps)
        precision, device = cfg.train.precision, world.device
        self.use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        self.null_class = cfg.model.num_classes
        self.skip_nonfinite = cfg.train.nonfinite == "skip_step" and not engine.steps_in_backward

    def run(self, batch: UnitBatch) -> StepOutcome:
        cfg, world, engine = self.cfg, self.world, self.engine
        device, unit, plan, step = world.device, world.dp_rank, batch.plan, batch.step
        images, labels, text = batch.images, batch.labels, batch.text
        if images.device != device or labels.device != device:
            raise ValueError(
                f"StepRunner.run: images on {images.device} and labels on {labels.device}, "
                f"but the step runs on {device}"
            )
        row_of = {int(sample): row for row, sample in enumerate(plan.samples_of(unit))}
        source_of = batch.sources if len(batch.sources) else np.zeros(plan.settings.batch, dtype=np.int64)
        labels = torch.where(labels < 0, torch.full_like(labels, self.null_class), labels)
        scale = world.gradient_ranks / plan.settings.batch
        losses, stage_ids, source_ids, layouts = [], [], [], set()
        tokens = padding = 0
        busy = BusyTime(device)
        micro_batches = plan.micro_batches(unit)
        for index, samples in enumerate(micro_batches):
            caption = caption_mask = None
            if len(samples):
                rows = to_device(torch.tensor([row_of[int(s)] for s in samples]), device)
                pairs = build_training_batch(
                    images.index_select(0, rows),
                    labels.index_select(0, rows),
                    plan.stages[samples].tolist(),
                    self.schedule,
                    cfg.model.patch_size,
                    cfg.seed,
                    step,
                    samples.tolist(),
                    cfg.model.class_dropout,
                    self.null_class,
                )
                if text is not None:
                    caption, caption_mask = text.micro_batch(
                        rows.index_select(0, to_device(torch.tensor(pairs.order), device)), pairs.draws
                    )
            else:
                pairs = padding_micro_batch(cfg, self.schedule, device, step)
                if text is not None:
                    caption, caption_mask = text.padding()
            shard = shard_stream(pairs.tokens, pairs.targets, pairs.layout, world.sp_rank, world.sp)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                prediction = engine.model(
                    shard.tokens,
                    pairs.layout,
                    pairs.timesteps,
                    pairs.labels if cfg.model.num_classes > 0 else None,
                    text=caption,
                    text_mask=caption_mask,
                    token_range=shard.token_range,
                )
            per_sample = per_sequence_mse(prediction, shard.targets, pairs.layout, shard.pieces)
            held = shard.tokens.shape[0]
            tokens += held
            layouts.add((pairs.layout, None if caption is None else caption.shape[1]))
            padding += held - shard.real if len(samples) else held
            weight = scale if len(samples) else 0.0  # a padding micro-batch's loss counts for nothing
            engine.backward(per_sample.sum() * weight, last=index == len(micro_batches) - 1)
            if len(samples):
                losses.append(per_sample.detach())
                stage_ids.append(pairs.stages)
                source_ids.append(to_device(torch.from_numpy(source_of[samples[pairs.order]]), device))
        busy.stop()
        if not losses:
            none = torch.zeros(0, dtype=torch.int64, device=device)
            losses, stage_ids, source_ids = [torch.zeros(0, device=device)], [none], [none]
        grad_norm = engine.step(skip_nonfinite=self.skip_nonfinite)
        ids = torch.cat(stage_ids), torch.cat(source_ids)
        return StepOutcome(torch.cat(losses), *ids, grad_norm, busy, tokens, padding, layouts)
