"""The training loop: planned batch -> cascade pairs on the device -> forward/backward -> step -> EMA ->
log -> maybe checkpoint. The same loop runs on one process or many (FSDP2/HSDP, Ulysses sequence
parallel, DeepSpeed ZeRO-3). Everything random is a function of (seed, step, sample), so a resumed run
continues exactly as an uninterrupted one would, and a global batch trains the same however it is split."""

from __future__ import annotations

import errno
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pixelflow.cascade import CascadeSchedule, build_training_batch, per_sequence_mse
from pixelflow.config import Config, compile_enabled, to_yaml
from pixelflow.data.exchange import exchange
from pixelflow.data.loader import DataStream, lane_reader, merge_states, slot_lanes
from pixelflow.data.planner import StepPlan, plan_settings, plan_step
from pixelflow.data.storage import storage_options
from pixelflow.data.text_store import embeddings_location
from pixelflow.devices import to_device
from pixelflow.errors import EXIT_FINISHED, EXIT_STOPPED, ConfigError, NonFiniteError, RunFailure
from pixelflow.model.layout import stream_pieces
from pixelflow.parallel.ulysses import sp_slice
from pixelflow.parallel.world import World, from_main, init_world, shutdown
from pixelflow.train.checkpoint import Checkpointer
from pixelflow.train.engine import Engine, build_engine
from pixelflow.train.metrics import MetricsLogger, SampleKeyLog
from pixelflow.train.preflight import preflight
from pixelflow.train.run_directory import RunLock, StartPlan, archive_lineage
from pixelflow.train.samples import PeriodicSamples
from pixelflow.train.signals import StopSignals, die_with_launcher, signal_numbers
from pixelflow.train.text_conditioning import TextConditioner, UnitText
from pixelflow.weights import committed_checkpoints

log = logging.getLogger(__name__)


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


class LossWindow:
    """Per-stage loss sums and step statistics since the last log, kept on the device (no host sync per
    step); summed over ranks at log time."""

    def __init__(
        self, stages: int, world: World, images_per_step: int, peak_tflops: float = 0.0, *, compiled: bool = False
    ):
        self.world, self.images_per_step, self.peak_tflops = world, images_per_step, peak_tflops
        self.compiled = compiled  # log the graphs dynamo has built (to compare with the shapes met)
        self.checkpoint_s = 0.0  # how long the newest checkpoint save held the loop
        self.sums = torch.zeros(stages, device=world.device)
        self.counts = torch.zeros(stages, device=world.device)
        self.grad_norm = torch.zeros((), device=world.device)
        self.layouts: set = set()  # for the whole run: how many graphs a compiled model has built
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()
        self.grad_norm.zero_()
        self.steps, self.skipped, self.started = 0, 0, time.perf_counter()
        self.busy: list[BusyTime] = []
        self.tokens, self.padding, self.predicted = 0, 0, 0.0
        self.wait_s, self.flops, self.trained_tokens = 0.0, 0.0, 0

    def add(self, outcome: StepOutcome, plan: StepPlan | None = None) -> None:
        # an SP group's ranks hold shares of their samples' losses; TP ranks each hold the whole loss
        if self.world.tp_rank == 0:
            self.sums.index_add_(0, outcome.stages, outcome.per_sample.detach())
        counted = 1.0 if self.world.sp_rank == 0 and self.world.tp_rank == 0 else 0.0
        self.counts.index_add_(0, outcome.stages, torch.full_like(outcome.per_sample, counted))
        self.grad_norm += outcome.grad_norm.detach().to(self.grad_norm.device)
        self.steps += 1
        self.count(outcome, plan)

    def count(self, outcome: StepOutcome, plan: StepPlan | None) -> None:
        """The statistics of a step, trained or skipped."""
        self.busy.append(outcome.busy)
        self.tokens += outcome.tokens
        self.padding += outcome.padding
        self.layouts |= outcome.layouts
        self.predicted += plan.max_over_mean if plan is not None else 1.0
        if plan is not None:
            self.flops += plan.training_flops()
            self.trained_tokens += plan.tokens()

    def summary(self, step: int, lr: float) -> dict:
        """The logged record (collective: every rank calls it at the same steps)."""
        steps = self.steps + self.skipped
        elapsed = time.perf_counter() - self.started
        busy = sum(one.seconds() for one in self.busy)
        extra = [busy, self.tokens, self.padding, self.wait_s]
        summed = torch.cat([self.sums, self.counts, self.sums.new_tensor(extra)])
        largest = self.sums.new_tensor([busy, len(self.layouts), peak_memory_gib(self.world.device)])
        if self.world.distributed:
            dist.all_reduce(summed)
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        stages = len(self.sums)
        sums, counts = summed[:stages].tolist(), summed[stages : 2 * stages].tolist()
        busy_total, tokens, padding, wait_total = summed[2 * stages :].tolist()
        busy_max, graphs, memory = largest.tolist()
        record = {"step": step, "loss": sum(sums) / max(sum(counts), 1.0)}
        record.update({f"loss_stage{i}": s / c for i, (s, c) in enumerate(zip(sums, counts)) if c > 0})
        record["grad_norm"] = self.grad_norm.item() / max(self.steps, 1)
        record["lr"] = lr
        record["img_per_s"] = steps * self.images_per_step / elapsed
        record["tokens_per_s"] = self.trained_tokens / elapsed
        if self.peak_tflops:
            record["mfu"] = self.flops / elapsed / (self.peak_tflops * 1e12 * self.world.size)
        record["data_wait_fraction"] = min(1.0, wait_total / (self.world.size * elapsed))
        record["peak_memory_gib"] = memory
        record["checkpoint_blocking_s"] = self.checkpoint_s
        # balance: the plan's predicted slowest/mean unit cost, and the measured slowest/mean rank busy time
        record["plan_max_over_mean"] = self.predicted / max(steps, 1)
        record["busy_max_over_mean"] = busy_max * self.world.size / busy_total if busy_total > 0 else 1.0
        record["padding_fraction"] = padding / tokens if tokens else 0.0
        record["graphs"] = int(graphs)
        if self.compiled:
            from torch._dynamo.utils import counters

            record["compiled_graphs"] = int(counters["stats"]["unique_graphs"])  # this rank's, since it started
        if self.skipped:
            record["skipped_steps"] = self.skipped  # train.nonfinite=skip_step: not in loss and grad_norm
        self.reset()
        return record


def periodic_samples(cfg: Config, world: World, run_dir: Path, conditioner) -> PeriodicSamples | None:
    """The periodic sample grids (sample.every), when they can be drawn."""
    if not cfg.sample.every:
        return None
    encoder = None
    if cfg.model.text_dim:
        encoder = conditioner.encoder
        if encoder is None and cfg.text.encoder:
            from pixelflow.model.text_encoder import TextEncoder

            encoder = TextEncoder(cfg.text.encoder, cfg.text.max_tokens, world.device)
        if encoder is None:
            log.warning("sample.every: no text.encoder to encode sample.prompts with; no sample grids")
            return None
    return PeriodicSamples(cfg, world, run_dir, encoder)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def padding_micro_batch(cfg: Config, schedule: CascadeSchedule, device: torch.device, step: int):
    """A one-sample, lowest-stage micro-batch whose loss counts zero: keeps a unit with fewer samples than
    the plan's micro-batch count in step with the others' collectives."""
    resolution = cfg.data.resolution
    images = torch.zeros((1, 3, resolution, resolution), dtype=torch.uint8, device=device)
    labels = torch.zeros(1, dtype=torch.int64, device=device)
    return build_training_batch(images, labels, [0], schedule, cfg.model.patch_size, cfg.seed, step, [-1])


def slice_rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor, zero rows past its end."""
    part = tensor[start:stop]
    missing = stop - start - part.shape[0]
    return torch.cat([part, part.new_zeros(missing, *part.shape[1:])]) if missing else part


def train_step(
    engine: Engine,
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: StepPlan,
    step: int,
    cfg: Config,
    schedule: CascadeSchedule,
    world: World,
    text: UnitText | None = None,
) -> StepOutcome:
    """One optimizer step of this rank's unit: images and labels (on the device) are the unit's samples,
    `plan.samples_of(unit)` in that order (and `text` their captions' embeddings, for text models), trained
    in the plan's micro-batches.

    The step's loss is the mean over the global batch of the per-sample losses, however the batch was
    split: each rank backpropagates its samples' sum / batch, times the ranks FSDP (or DeepSpeed) averages
    gradients over; an SP group's ranks hold shares of their samples' losses that add up."""
    device, unit = world.device, world.dp_rank
    if images.device != device or labels.device != device:
        raise ValueError(
            f"train_step: images on {images.device} and labels on {labels.device}, but the step runs on {device}"
        )
    row_of = {int(sample): row for row, sample in enumerate(plan.samples_of(unit))}
    null_class = cfg.model.num_classes
    labels = torch.where(labels < 0, torch.full_like(labels, null_class), labels)
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    scale = world.gradient_ranks / plan.settings.batch
    losses, stage_ids, layouts = [], [], set()
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
                schedule,
                cfg.model.patch_size,
                cfg.seed,
                step,
                samples.tolist(),
                cfg.model.class_dropout,
                null_class,
            )
            if text is not None:
                caption, caption_mask = text.micro_batch(
                    rows.index_select(0, to_device(torch.tensor(pairs.order), device)), pairs.draws
                )
        else:
            pairs = padding_micro_batch(cfg, schedule, device, step)
            if text is not None:
                caption, caption_mask = text.padding()
        stream, token_range, pieces = pairs.layout.num_tokens, None, None
        model_tokens, targets = pairs.tokens, pairs.targets
        if world.sp > 1:
            token_range = sp_slice(stream, world.sp_rank, world.sp)
            model_tokens, targets = slice_rows(model_tokens, *token_range), slice_rows(targets, *token_range)
            pieces = stream_pieces(pairs.layout, *token_range)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            prediction = engine.model(
                model_tokens,
                pairs.layout,
                pairs.timesteps,
                pairs.labels if cfg.model.num_classes > 0 else None,
                text=caption,
                text_mask=caption_mask,
                token_range=token_range,
            )
        per_sample = per_sequence_mse(prediction, targets, pairs.layout, pieces)
        held = model_tokens.shape[0]
        tokens += held
        layouts.add((pairs.layout, None if caption is None else caption.shape[1]))
        real = held if token_range is None else max(0, min(token_range[1], stream) - token_range[0])
        padding += held - real if len(samples) else held
        weight = scale if len(samples) else 0.0  # a padding micro-batch's loss counts for nothing
        engine.backward(per_sample.sum() * weight, last=index == len(micro_batches) - 1)
        if len(samples):
            losses.append(per_sample.detach())
            stage_ids.append(pairs.stages)
    busy.stop()
    if not losses:
        losses, stage_ids = [torch.zeros(0, device=device)], [torch.zeros(0, dtype=torch.int64, device=device)]
    grad_norm = engine.step(skip_nonfinite=cfg.train.nonfinite == "skip_step")
    return StepOutcome(torch.cat(losses), torch.cat(stage_ids), grad_norm, busy, tokens, padding, layouts)


def prepare_run_dir(cfg: Config, world: World, lock: RunLock | None, plan: StartPlan) -> Path:
    """Make the run directory, take its lock, move an abandoned lineage aside and write the config (rank 0;
    collective: every rank gets rank 0's error)."""
    run_dir = Path(cfg.run_dir)

    def prepare() -> None:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, read-only, not creatable
            problem = f"run_dir: {exc.filename or run_dir}: cannot write the run directory ({exc.strerror})"
            raise ConfigError(problem) from None
        lock.acquire()
        lock.record()
        if plan.archive_after is not None:
            folder = archive_lineage(run_dir, plan.archive_after)
            log.warning(
                "resume=%s starts a new lineage after step %d: the run directory's later records are in %s",
                cfg.resume,
                plan.archive_after,
                folder,
            )
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    from_main(world, prepare)
    return run_dir


def start_checks(cfg: Config, lock: RunLock) -> StartPlan:
    """Rank 0's checks before anything is built: the lock of an existing run directory, then preflight."""
    if Path(cfg.run_dir).is_dir():
        lock.acquire()
    return preflight(cfg, lock)


def gather(world: World, value):
    """Every rank's value, in rank order (collective)."""
    if not world.distributed:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value, group=world.control)
    return out


class TrainProgress:
    """The checkpoint part that decides the next batch: the step and every data lane's cursor; and the
    lineage's origin (where its first start was told to resume from; see train/run_directory.py)."""

    def __init__(self, world: World, origin: str | None = None):
        self.world, self.step, self.data_state, self.stream, self.origin = world, 0, None, None, origin

    def state_dict(self) -> dict:
        """Collective once streaming: the lanes' cursors are spread over the data ranks."""
        data = self.data_state if self.stream is None else merge_states(gather(self.world, self.stream.state_dict()))
        return {"step": self.step, "data": data, "origin": self.origin}

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


def open_stream(cfg: Config, world: World, state: dict | None, first_step: int) -> DataStream:
    """This data rank's share of every global batch from `first_step` on, continuing from a checkpoint's lane
    cursors when given."""
    return DataStream(
        cfg.data.path,
        cfg.train.global_batch,
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
        first_step=first_step,
        text=text_payload(cfg),
        embeddings=embeddings_location(cfg.text.embeddings, cfg.data.path) if cfg.model.text_dim else "",
        expand_ratio=cfg.data.expand_ratio,
        resize_filter=cfg.data.resize_filter,
        text_dim=cfg.model.text_dim or 0,
    )


def text_payload(cfg: Config) -> str:
    """What travels with each image: nothing (class models), its caption, or its precomputed embedding."""
    if not cfg.model.text_dim:
        return ""
    return "captions" if cfg.text.mode == "online" else "embeddings"


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")
STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def outside_failure(exc: Exception, cfg: Config, world: World) -> RunFailure | None:
    """A failure from outside the run as one line: another rank died or hung (a collective failed), or the
    run directory's storage is full or read-only. None: something else (a bug's traceback follows)."""
    committed = committed_checkpoints(Path(cfg.run_dir) / "checkpoints")
    newest = f"the newest committed checkpoint is {committed[-1].name}" if committed else "no checkpoint was committed"
    rerun = f"{newest}: run the same command again to resume"
    if isinstance(exc, OSError) and exc.errno in STORAGE_FULL:
        return RunFailure(f"{exc.filename or cfg.run_dir}: {exc.strerror}; {rerun}")
    text = str(exc)
    if not world.distributed or not isinstance(exc, RuntimeError):
        return None
    if "Timed out" in text or "timed out" in text:
        return RunFailure(
            f"rank {world.rank}: a collective waited longer than train.collective_timeout_s = "
            f"{cfg.train.collective_timeout_s:g} s for another rank (hung, stopped or too slow?); {rerun}"
        )
    if any(marker in text for marker in PEER_LOST):
        return RunFailure(
            f"rank {world.rank}: lost the connection to another rank (it died: its log says why); {rerun}"
        )
    return None


def train(cfg: Config) -> RunResult:
    """Train (or resume) the run described by cfg."""
    die_with_launcher()
    world = init_world(cfg, cfg.train.device)
    clean = False
    try:
        result = _train(cfg, world)
        clean = True
        return result
    except (RuntimeError, OSError) as exc:
        failure = outside_failure(exc, cfg, world)
        if failure is None:
            raise
        raise failure from exc
    finally:
        shutdown(world, clean)


def _train(cfg: Config, world: World) -> RunResult:
    with ExitStack() as cleanup:
        stop = cleanup.enter_context(StopSignals(cfg.train.stop_signals, world))
        lock = cleanup.enter_context(RunLock(Path(cfg.run_dir))) if world.is_main else None
        # everything that can refuse the run, before anything is built or written (launchers check the same)
        plan = from_main(world, lambda: start_checks(cfg, lock))
        engine = build_engine(cfg, world)
        checkpointer = Checkpointer(Path(cfg.run_dir) / "checkpoints", cfg.checkpoint, world, cfg)
        # after an error on one rank the others may never join the save in flight; after one they all share, wait
        cleanup.push(lambda failed, *_: checkpointer.close(wait=failed is None or failed is NonFiniteError))
        progress = TrainProgress(world)
        parts = {**engine.checkpoint_parts(), "train": progress}
        if plan.source is not None:
            checkpointer.load(plan.source, parts)
            log.info(
                "%s from %s at step %d",
                "resumed" if plan.source.full else "weights loaded",
                plan.source.path,
                progress.step,
            )
        if plan.origin is not None:  # where this lineage started, when it is a folder of this run: never pruned
            checkpointer.protected = {Path(plan.origin), *([plan.source.path] if plan.branches else [])}
        progress.origin = plan.origin  # this lineage's, whatever the loaded state's own was
        if plan.continued:
            log.info("resume=%s started this run: continuing from its own checkpoints", cfg.resume)
        if plan.changes:
            log.warning("config differs from the checkpoint's: %s", "; ".join(plan.changes))
        conditioner = TextConditioner(cfg, world) if cfg.model.text_dim else None
        data = open_stream(cfg, world, progress.data_state, progress.step + 1)
        cleanup.callback(data.close)
        run_dir = prepare_run_dir(cfg, world, lock, plan)
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
        compiled = compile_enabled(cfg, world.device.type)
        window = LossWindow(cfg.cascade.stages, world, cfg.train.global_batch, cfg.train.peak_tflops, compiled=compiled)
        samples = periodic_samples(cfg, world, run_dir, conditioner)
        settings = plan_settings(cfg, world.dp_size)
        exchange_group = world.dp_mesh.get_group() if world.distributed and world.dp_size > 1 else None
        engine.model.train()
        # DeepSpeed applies every step itself: its runs stop at a non-finite one whatever train.nonfinite says
        skipping = cfg.train.nonfinite == "skip_step" and cfg.engine != "deepspeed"
        nonfinite = NonFiniteWatch(world.device)
        stopping = None
        while step < cfg.train.steps and not stopping:
            waiting = time.perf_counter()
            share = next(data)
            step += 1
            plan = plan_step(settings, step)
            readers = lane_reader(slot_lanes(step, cfg.train.global_batch, data.num_lanes), world.dp_size)
            images, labels, payloads = exchange(
                share,
                plan,
                readers,
                world.dp_rank,
                exchange_group,
                world.device,
                conditioner is not None,
                world.control,
            )
            window.wait_s += time.perf_counter() - waiting  # blocked on the loader and the samples' exchange
            text = conditioner.unit(payloads) if conditioner else None
            outcome = train_step(engine, images, labels, plan, step, cfg, schedule, world, text)
            if skipping and not torch.isfinite(outcome.grad_norm):  # the same on every rank: the norm is global
                log.warning("step %d skipped: the loss or gradient is not finite", step)
                window.skipped += 1
                window.count(outcome, plan)
            else:
                nonfinite.add(step, outcome.grad_norm)
                window.add(outcome, plan)
            if keys:
                keys.log(step, share.keys)
            if metrics:
                metrics.advance()
            if step == 1 or step % cfg.train.log_every == 0 or step == cfg.train.steps:
                nonfinite.check()
                record = window.summary(step, engine.last_lr)
                if metrics:
                    metrics.log(record)
            if samples and samples.due(step):
                nonfinite.check()
                grid = samples.write(step, engine.checkpoint_parts()["ema"].state_dict())
                if metrics and grid:
                    metrics.log_image(grid, step)
            stopping, save_failed = stop.agreed(trouble=checkpointer.failed())
            if save_failed:  # the save in flight failed on some rank: every rank stops here, together
                checkpointer.raise_failure()
            stopping = stopping if step < cfg.train.steps else None  # a signal at the last step: finished
            if stopping or step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                nonfinite.check()
                progress.step = step
                checkpointer.save(step, parts, blocking=stopping is not None)
                window.checkpoint_s = checkpointer.last_blocking_s
        checkpointer.wait()
        return RunResult(run_dir, step, stopping)
