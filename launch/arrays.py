"""Dataset preparation as SLURM job arrays: task i of n handles every n-th shard from the i-th, resumable as
the local command is (finished shards are skipped), so a failed task can be submitted again alone
(`--task I`). Ingest and index add a final step that starts once every task succeeded and writes the manifest and
the merged report; encode-text needs none (each shard's embeddings index is its own commit)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from launch.slurm import executor
from pixelflow.config import SlurmConfig

Step = Callable[[argparse.Namespace, "tuple[int, int] | None"], object]


class ArrayTask:
    """One array task (or, with part None, a final step): `step(args, part)`, its report as a dict."""

    def __init__(self, step: Step, args: argparse.Namespace, part: tuple[int, int] | None):
        self.step, self.args, self.part = step, args, part

    def __call__(self) -> dict:
        return asdict(self.step(self.args, self.part))  # pyright: ignore[reportArgumentType] (every step returns a report dataclass)


def submit_array(
    args: argparse.Namespace, slurm: SlurmConfig, tasks: list[int], step: Step, final: bool
) -> tuple[list[str], str | None]:
    """Submit `step` over the array (only `tasks` of the --tasks slices) and, when `final`, the dependent
    final step; returns (array task job ids, final job id or None)."""
    logs = Path(args.logs).resolve()
    runner = executor(logs, slurm, max_timeouts=0)
    with runner.batch():
        jobs = [runner.submit(ArrayTask(step, args, (task, args.tasks))) for task in tasks]
    if not final:
        return [job.job_id for job in jobs], None
    array_id = jobs[0].job_id.split("_")[0]
    last = executor(logs, slurm, max_timeouts=0)
    last.update_parameters(slurm_additional_parameters={**slurm.extra_sbatch, "dependency": f"afterok:{array_id}"})
    return [job.job_id for job in jobs], last.submit(ArrayTask(step, args, None)).job_id


def absolute(path: str) -> str:
    """Paths as the jobs see them (they may start elsewhere); s3:// stays as it is."""
    return path if "://" in path else str(Path(path).resolve())
