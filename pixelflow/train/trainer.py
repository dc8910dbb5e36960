"""The training loop. Its body names components: the batches (data/exchange/text behind one seam), the
step runner, the non-finite watch, the loss window and metrics, the periodic grids, the stop signals and
the checkpointer; each periodic job decides its own timing. The same loop runs on one process or many
(FSDP2/HSDP, Ulysses sequence parallel, tensor parallel, DeepSpeed ZeRO-3). Everything random is a
function of (seed, step, sample), so a resumed run continues exactly as an uninterrupted one would, and a
global batch trains the same however it is split."""

from __future__ import annotations

import errno
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from pixelflow.config import Config, compile_enabled, to_yaml
from pixelflow.errors import EXIT_FINISHED, EXIT_STOPPED, ConfigError, NonFiniteError, RunFailure
from pixelflow.parallel.world import World, from_main, init_world, shutdown
from pixelflow.train.batches import Batches
from pixelflow.train.checkpoint import Checkpointer
from pixelflow.train.engines import build_engine
from pixelflow.train.metrics import LossWindow, MetricsLogger, SampleKeyLog
from pixelflow.train.preflight import preflight
from pixelflow.train.run_directory import RunLock, StartPlan, archive_lineage
from pixelflow.train.samples import PeriodicSamples
from pixelflow.train.signals import StopSignals, die_with_launcher
from pixelflow.train.step import NonFiniteWatch, StepRunner
from pixelflow.weights import committed_checkpoints

log = logging.getLogger(__name__)


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


def prepare_run_dir(cfg: Config, world: World, lock: RunLock | None, plan: StartPlan) -> Path:
    """Make the run directory, take its lock, move an abandoned lineage aside and write the config (rank 0;
    collective: every rank gets rank 0's error)."""
    run_dir = Path(cfg.run_dir)

    def prepare() -> None:
        assert lock is not None  # run on rank 0, which holds the lock
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


def start_checks(cfg: Config, lock: RunLock | None) -> StartPlan:
    """Rank 0's checks before anything is built: the lock of an existing run directory, then preflight."""
    assert lock is not None  # rank 0 holds the lock
    if Path(cfg.run_dir).is_dir():
        lock.acquire()
    return preflight(cfg, lock)


class TrainProgress:
    """The checkpoint part that decides the next batch: the step and every data lane's cursor; and the
    lineage's origin (where its first start was told to resume from; see train/run_directory.py)."""

    def __init__(self, world: World, origin: str | None = None):
        self.world, self.step, self.data_state, self.origin = world, 0, None, origin
        self.batches: Batches | None = None

    def state_dict(self) -> dict:
        """Collective once batches flow: the lanes' cursors are spread over the data ranks."""
        data = self.data_state if self.batches is None else self.batches.state_dict()
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
            checkpointer.protected = {Path(plan.origin), *([plan.source.path] if plan.branches and plan.source else [])}
        progress.origin = plan.origin  # this lineage's, whatever the loaded state's own was
        if plan.continued:
            log.info("resume=%s started this run: continuing from its own checkpoints", cfg.resume)
        if plan.changes:
            log.warning("config differs from the checkpoint's: %s", "; ".join(plan.changes))
        batches = Batches(cfg, world, state=progress.data_state, first_step=progress.step + 1)
        cleanup.callback(batches.close)
        run_dir = prepare_run_dir(cfg, world, lock, plan)
        progress.batches = batches
        step = progress.step
        metrics = keys = None
        if world.is_main:
            metrics = MetricsLogger(run_dir, cfg.wandb, {"config": to_yaml(cfg)}, step, cfg.train.steps)
            cleanup.callback(metrics.close)
        if cfg.train.log_sample_keys and world.sp_rank == 0:
            keys = SampleKeyLog(run_dir, world.dp_rank, step, world.dp_size)
            cleanup.callback(keys.close)
        window = LossWindow(
            cfg.cascade.stages,
            world,
            cfg.train.global_batch,
            cfg.train.peak_tflops,
            compiled=compile_enabled(cfg, world.device.type),
            log_every=cfg.train.log_every,
            last_step=cfg.train.steps,
            sources=tuple(source.label for source in cfg.data.datasets()),
        )
        samples = periodic_samples(cfg, world, run_dir, batches.conditioner)
        runner = StepRunner(cfg, world, engine)
        nonfinite = NonFiniteWatch(world.device)
        engine.model.train()
        stopping = None
        while step < cfg.train.steps and not stopping:
            batch = next(batches)
            step = batch.step
            window.wait_s += batch.wait_s
            outcome = runner.run(batch)
            if runner.skip_nonfinite and not torch.isfinite(outcome.grad_norm):  # the norm is global: every rank
                log.warning("step %d skipped: the loss or gradient is not finite", step)
                window.skip(outcome, batch.plan)
            else:
                nonfinite.add(step, outcome.grad_norm)
                window.add(outcome, batch.plan)
            if keys:
                keys.log(step, batch.keys)
            if metrics:
                metrics.advance()
            if window.due(step):
                nonfinite.check()
                record = {**window.summary(step, engine.last_lr), "resolution": cfg.data.resolution_at(step)}
                if metrics:
                    metrics.log(record)
            if samples and samples.due(step):
                nonfinite.check()
                grid = samples.write(step, engine.ema_state())
                if metrics and grid:
                    metrics.log_image(grid, step)
            stopping, save_failed = stop.agreed(trouble=checkpointer.failed())
            if save_failed:  # the save in flight failed on some rank: every rank stops here, together
                checkpointer.raise_failure()
            stopping = stopping if step < cfg.train.steps else None  # a signal at the last step: finished
            if stopping or checkpointer.due(step, last=step == cfg.train.steps):
                nonfinite.check()
                progress.step = step
                checkpointer.save(step, parts, blocking=stopping is not None)
                window.checkpoint_s = checkpointer.last_blocking_s
        checkpointer.wait()
        return RunResult(run_dir, step, stopping)
