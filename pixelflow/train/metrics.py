"""Training metrics: the loss window summed over ranks at each log step, metrics.jsonl in the run
directory, a progress bar, and optionally wandb."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from pixelflow.config import WandbConfig
from pixelflow.data.planner import StepPlan
from pixelflow.parallel.world import World
from pixelflow.records import split_at_step
from pixelflow.train.step import BusyTime, StepOutcome

log = logging.getLogger(__name__)


def _wandb_has_key() -> bool:
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


class MetricsLogger:
    """Appends one JSON object per logged step; on resume, drops lines past the checkpoint's step so a
    restarted run never leaves duplicate or stale steps behind."""

    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, config: dict, start_step: int, total_steps: int):
        self.path = run_dir / "metrics.jsonl"
        self._file = open_at_step(self.path, start_step)
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=None)
        self._wandb = self._start_wandb(wandb_cfg, run_dir, config)

    @staticmethod
    def _start_wandb(cfg: WandbConfig, run_dir: Path, config: dict):
        if cfg.mode == "disabled":
            return None
        mode = cfg.mode
        if mode == "online" and not _wandb_has_key():
            log.warning("wandb.mode=online but no API key is configured; logging offline instead")
            mode = "offline"
        import wandb  # imported only when used: it is slow to import

        return wandb.init(
            project=cfg.project,
            name=cfg.name,
            dir=str(run_dir),
            mode=mode,  # pyright: ignore[reportArgumentType] (one of WandbConfig.CHOICES)
            config=config,
            resume="allow",
            id=_wandb_run_id(run_dir),
        )

    def advance(self) -> None:
        self._bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._bar.disable:
            print(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                file=sys.stdout,
                flush=True,
            )
        else:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")

    def log_image(self, path: Path, step: int) -> None:
        """A sample grid, to wandb (the PNG itself is already in the run directory)."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({"samples": wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def open_at_step(path: Path, step: int):
    """Open a JSON-lines log for appending after dropping the records of steps past `step` (written after
    the checkpoint a run resumes from, so they are about to be written again) and a torn last line."""
    split_at_step(path, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a")


class SampleKeyLog:
    """Which samples one data rank trained on at each step (`train.log_sample_keys`): an audit trail that
    shows no sample is repeated or skipped across restarts and layout changes."""

    def __init__(self, run_dir: Path, dp_rank: int, start_step: int, dp_size: int):
        folder = run_dir / "sample_keys"
        self._file = open_at_step(folder / f"dp_rank_{dp_rank:05d}.jsonl", start_step)
        if dp_rank == 0:  # a resume on fewer data ranks: the others' logs past the start are not theirs now
            for path in sorted(folder.glob("dp_rank_*.jsonl")):
                if path.stem[8:].isdigit() and int(path.stem[8:]) >= dp_size:
                    split_at_step(path, start_step)

    def log(self, step: int, keys: Sequence[str]) -> None:
        self._file.write(json.dumps({"step": step, "keys": keys}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _wandb_run_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(os.urandom(6).hex())
    return id_file.read_text().strip()


class LossWindow:
    """Per-stage (and, for a mixture, per-source) loss sums and step statistics since the last log, kept on
    the device (no host sync per step); summed over ranks at log time."""

    def __init__(
        self,
        stages: int,
        world: World,
        images_per_step: int,
        peak_tflops: float = 0.0,
        *,
        compiled: bool = False,
        log_every: int = 1,
        last_step: int = 0,
        sources: tuple[str, ...] = (),
    ):
        self.world, self.images_per_step, self.peak_tflops = world, images_per_step, peak_tflops
        self.stages = stages
        self.sources = sources if len(sources) > 1 else ()  # names of a mixture's sources: loss_source_<name>
        self.log_every, self.last_step = log_every, last_step
        self.compiled = compiled  # log the graphs dynamo has built (to compare with the shapes met)
        self.checkpoint_s = 0.0  # how long the newest checkpoint save held the loop
        self.sums = torch.zeros(stages + len(self.sources), device=world.device)  # stages, then sources
        self.counts = torch.zeros_like(self.sums)
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
        groups = [outcome.stages, *([outcome.sources + self.stages] if self.sources else [])]
        counted = 1.0 if self.world.sp_rank == 0 and self.world.tp_rank == 0 else 0.0
        for group in groups:
            if self.world.tp_rank == 0:
                self.sums.index_add_(0, group, outcome.per_sample.detach())
            self.counts.index_add_(0, group, torch.full_like(outcome.per_sample, counted))
        self.grad_norm += outcome.grad_norm.detach().to(self.grad_norm.device)
        self.steps += 1
        self.count(outcome, plan)

    def skip(self, outcome: StepOutcome, plan: StepPlan) -> None:
        """A step not applied (train.nonfinite=skip_step): counted, kept out of loss and grad norm."""
        self.skipped += 1
        self.count(outcome, plan)

    def due(self, step: int) -> bool:
        """Whether this step logs: the first, every log_every-th and the last."""
        return step == 1 or step % self.log_every == 0 or step == self.last_step

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
        groups, stages = len(self.sums), self.stages
        sums, counts = summed[:stages].tolist(), summed[groups : groups + stages].tolist()
        by_source = list(
            zip(self.sources, summed[stages:groups].tolist(), summed[groups + stages : 2 * groups].tolist())
        )
        busy_total, tokens, padding, wait_total = summed[2 * groups :].tolist()
        busy_max, graphs, memory = largest.tolist()
        record = {"step": step, "loss": sum(sums) / max(sum(counts), 1.0)}
        record.update({f"loss_stage{i}": s / c for i, (s, c) in enumerate(zip(sums, counts)) if c > 0})
        record.update({f"loss_source_{name}": s / c for name, s, c in by_source if c > 0})
        record.update({f"share_source_{name}": c / max(sum(counts), 1.0) for name, _, c in by_source})
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


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
