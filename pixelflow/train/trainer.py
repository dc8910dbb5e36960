"""The training loop: planned batch -> cascade pairs on the device -> forward/backward -> step -> EMA ->
log -> maybe checkpoint. The same loop runs on one process or many (FSDP2/HSDP, Ulysses sequence
parallel, DeepSpeed ZeRO-3). Everything random is a function of (seed, step, sample), so a resumed run
continues exactly as an uninterrupted one would, and a global batch trains the same however it is split."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pixelflow.cascade import CascadeSchedule, build_training_batch, per_sequence_mse
from pixelflow.config import Config, ConfigError, to_yaml
from pixelflow.data.loader import Batch, DataStream, merge_states
from pixelflow.data.planner import plan_stages
from pixelflow.data.storage import storage_options
from pixelflow.model.layout import stream_pieces
from pixelflow.parallel.ulysses import sp_slice
from pixelflow.parallel.world import World, init_world, shutdown
from pixelflow.train.checkpoint import Checkpointer
from pixelflow.train.engine import Engine, build_engine
from pixelflow.train.metrics import MetricsLogger, SampleKeyLog
from pixelflow.train.signals import EXIT_FINISHED, EXIT_STOPPED, StopSignals, signal_numbers

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN or infinite (train.nonfinite=stop); the message names the step."""


class LossWindow:
    """Per-stage loss sums since the last log, kept on the device (no host sync per step); summed over
    ranks at log time."""

    def __init__(self, stages: int, world: World, images_per_step: int):
        self.world, self.images_per_step = world, images_per_step
        self.sums = torch.zeros(stages, device=world.device)
        self.counts = torch.zeros(stages, device=world.device)
        self.grad_norm = torch.zeros((), device=world.device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()
        self.grad_norm.zero_()
        self.steps, self.skipped, self.started = 0, 0, time.perf_counter()

    def add(self, per_sample: torch.Tensor, stages: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.sums.index_add_(0, stages, per_sample.detach())
        counted = 1.0 if self.world.sp_rank == 0 else 0.0  # an SP group's ranks share their samples
        self.counts.index_add_(0, stages, torch.full_like(per_sample, counted))
        self.grad_norm += grad_norm.detach().to(self.grad_norm.device)
        self.steps += 1

    def summary(self, step: int, lr: float) -> dict:
        """The logged record (collective: every rank calls it at the same steps)."""
        totals = torch.stack([self.sums, self.counts])
        if self.world.distributed:
            dist.all_reduce(totals)
        sums, counts = totals.tolist()
        record = {"step": step, "loss": sum(sums) / max(sum(counts), 1.0)}
        record.update({f"loss_stage{i}": s / c for i, (s, c) in enumerate(zip(sums, counts)) if c > 0})
        record["grad_norm"] = self.grad_norm.item() / max(self.steps, 1)
        record["lr"] = lr
        record["img_per_s"] = (self.steps + self.skipped) * self.images_per_step / (time.perf_counter() - self.started)
        if self.skipped:
            record["skipped_steps"] = self.skipped  # train.nonfinite=skip_step: not in loss and grad_norm
        self.reset()
        return record


def slice_rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor, zero rows past its end."""
    part = tensor[start:stop]
    missing = stop - start - part.shape[0]
    return torch.cat([part, part.new_zeros(missing, *part.shape[1:])]) if missing else part


def train_step(
    engine: Engine, batch: Batch, step: int, cfg: Config, schedule: CascadeSchedule, world: World
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step; batch is this data rank's share of the global batch. Returns (per-sample loss
    share, stage per sample, grad norm)."""
    device = world.device
    local = batch.images.shape[0]
    micro = cfg.train.micro_batch or local
    first_id = world.dp_rank * local
    stages = plan_stages(step, cfg.train.global_batch, schedule.stages, cfg.seed)[first_id : first_id + local]
    images = batch.images.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    null_class = cfg.model.num_classes
    labels = torch.where(labels < 0, torch.full_like(labels, null_class), labels)
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    losses, stage_ids = [], []
    for first in range(0, local, micro):
        part = slice(first, first + micro)
        ids = range(first_id + first, first_id + first + micro)
        pairs = build_training_batch(
            images[part],
            labels[part],
            stages[part],
            schedule,
            cfg.model.patch_size,
            cfg.seed,
            step,
            ids,
            cfg.model.class_dropout,
            null_class,
        )
        tokens, targets, token_range, pieces = pairs.tokens, pairs.targets, None, None
        if world.sp > 1:
            token_range = sp_slice(pairs.layout.num_tokens, world.sp_rank, world.sp)
            tokens, targets = slice_rows(tokens, *token_range), slice_rows(targets, *token_range)
            pieces = stream_pieces(pairs.layout, *token_range)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            prediction = engine.model(
                tokens,
                pairs.layout,
                pairs.timesteps,
                pairs.labels if cfg.model.num_classes > 0 else None,
                token_range=token_range,
            )
        per_sample = per_sequence_mse(prediction, targets, pairs.layout, pieces)
        # FSDP averages gradients over dp_shard x sp ranks; an SP group's shares must add up, hence x sp
        engine.backward(per_sample.sum() * world.sp / local)
        losses.append(per_sample.detach())
        stage_ids.append(pairs.stages)
    return torch.cat(losses), torch.cat(stage_ids), engine.step()


def prepare_run_dir(cfg: Config, world: World) -> Path:
    """Create the run directory and write the config (collective: every rank gets rank 0's error)."""
    run_dir = Path(cfg.run_dir)
    problem = None
    if world.is_main:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        except OSError as exc:  # a file in the way, read-only, not creatable
            problem = f"run_dir: {exc.filename or run_dir}: cannot write the run directory ({exc.strerror or exc})"
    problem = gather(world, problem)[0]  # also: the directory exists before any rank writes into it
    if problem:
        raise ConfigError(problem)
    return run_dir


def gather(world: World, value):
    """Every rank's value, in rank order (collective)."""
    if not world.distributed:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


class TrainProgress:
    """The checkpoint part that decides the next batch: the step and every data lane's cursor."""

    def __init__(self, world: World):
        self.world, self.step, self.data_state, self.stream = world, 0, None, None

    def state_dict(self) -> dict:
        """Collective once streaming: the lanes' cursors are spread over the data ranks."""
        if self.stream is None:
            return {"step": self.step, "data": self.data_state}
        return {"step": self.step, "data": merge_states(gather(self.world, self.stream.state_dict()))}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.data_state = int(state["step"]), state["data"]


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    step: int
    stop_signal: str | None  # the signal that stopped the run after a committed checkpoint; None = finished

    @property
    def stopped(self) -> bool:
        return self.stop_signal is not None

    @property
    def exit_status(self) -> int:
        return EXIT_STOPPED if self.stopped else EXIT_FINISHED


def open_stream(cfg: Config, world: World, state: dict | None) -> DataStream:
    """This data rank's stream, continuing from a checkpoint's lane cursors when given."""
    return DataStream(
        cfg.data.path,
        cfg.train.global_batch // world.dp_size,
        cfg.data.resolution,
        cfg.seed,
        cfg.data.num_workers,
        cfg.data.shuffle_block,
        rank=world.dp_rank,
        world_size=world.dp_size,
        state=state,
        storage_options=storage_options(cfg.data.path, cfg.data.endpoint_url),
        pin_memory=world.device.type == "cuda",
        lanes=cfg.data.lanes,
        retries=cfg.data.retries,
        retry_wait=cfg.data.retry_wait,
        ignore_signals=tuple(signal_numbers(cfg.train.stop_signals)),
        num_classes=cfg.model.num_classes,
        max_pixels=cfg.data.max_pixels,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )


def train(cfg: Config) -> RunResult:
    """Train (or resume) the run described by cfg."""
    world = init_world(cfg, cfg.train.device)
    clean = False
    try:
        result = _train(cfg, world)
        clean = True
        return result
    finally:
        shutdown(world, clean)


def _train(cfg: Config, world: World) -> RunResult:
    with ExitStack() as cleanup:
        stop = cleanup.enter_context(StopSignals(cfg.train.stop_signals, world))
        engine = build_engine(cfg, world)
        checkpointer = Checkpointer(Path(cfg.run_dir) / "checkpoints", cfg.checkpoint, world, cfg)
        # after an error on one rank the others may never join the save in flight; after one they all share, wait
        cleanup.push(lambda failed, *_: checkpointer.close(wait=failed is None or failed is NonFiniteError))
        progress = TrainProgress(world)
        parts = {**engine.checkpoint_parts(), "train": progress}
        source = checkpointer.find_resume(cfg.resume)
        if source is not None:  # a checkpoint that cannot be used stops the run before the directory is touched
            checkpointer.load(source, parts)
            log.info(
                "%s from %s at step %d", "resumed" if source.full else "weights loaded", source.path, progress.step
            )
        data = open_stream(cfg, world, progress.data_state)  # a bad dataset stops the run before it writes
        cleanup.callback(data.close)
        run_dir = prepare_run_dir(cfg, world)
        progress.stream = data
        step = progress.step
        schedule = CascadeSchedule.build(cfg.cascade.stages, cfg.cascade.gamma, cfg.cascade.num_train_timesteps)
        metrics = keys = None
        if world.is_main:
            metrics = MetricsLogger(run_dir, cfg.wandb, {"config": to_yaml(cfg)}, step, cfg.train.steps)
            cleanup.callback(metrics.close)
        if cfg.train.log_sample_keys and world.sp_rank == 0:
            keys = SampleKeyLog(run_dir, world.dp_rank, step)
            cleanup.callback(keys.close)
        window = LossWindow(cfg.cascade.stages, world, cfg.train.global_batch)
        engine.model.train()
        stopping = None
        while step < cfg.train.steps and not stopping:
            batch = next(data)
            step += 1
            per_sample, stages, grad_norm = train_step(engine, batch, step, cfg, schedule, world)
            if not torch.isfinite(grad_norm):  # the same on every rank: the norm is global
                if cfg.train.nonfinite == "stop" or cfg.engine == "deepspeed":  # DeepSpeed has applied it
                    raise NonFiniteError(
                        f"step {step}: the loss or gradient is not finite (grad norm {grad_norm.item()}); stopped "
                        f"without saving, the newest committed checkpoint is unchanged (train.nonfinite=skip_step "
                        f"skips such steps instead)"
                    )
                log.warning("step %d skipped: the loss or gradient is not finite", step)
                window.skipped += 1
            else:
                window.add(per_sample, stages, grad_norm)
            if keys:
                keys.log(step, batch.keys)
            if metrics:
                metrics.advance()
            if step == 1 or step % cfg.train.log_every == 0 or step == cfg.train.steps:
                record = window.summary(step, engine.last_lr)
                if metrics:
                    metrics.log(record)
            stopping = stop.agreed() if step < cfg.train.steps else None  # a signal at the last step: finished
            if stopping or step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                progress.step = step
                checkpointer.save(step, parts, blocking=stopping is not None)
        checkpointer.wait()
        return RunResult(run_dir, step, stopping)
