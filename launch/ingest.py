"""Ingest as a SLURM job array: task i writes every n-th shard from the i-th (resumable, as the local
ingest: complete shards are skipped), and a final step that starts once every task succeeded writes the
manifest and the merged report. A failed task can be submitted again alone (`--task I`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.slurm import executor
from pixelflow.config import SlurmConfig


class IngestSlice:
    """One array task (or, with part None, the final step)."""

    def __init__(self, args: argparse.Namespace, part: tuple[int, int] | None):
        self.args, self.part = args, part

    def __call__(self) -> dict:
        from dataclasses import asdict

        from data_tools.cli import run_ingest

        return asdict(run_ingest(self.args, self.part))


def submit_ingest(args: argparse.Namespace, slurm: SlurmConfig, tasks: list[int]) -> tuple[list[str], str]:
    """Submit the array (only `tasks` of the --tasks slices) and the dependent final step; returns
    (array task job ids, final job id)."""
    logs = Path(args.logs).resolve()
    args.input = str(Path(args.input).resolve())
    if "://" not in args.output:
        args.output = str(Path(args.output).resolve())
    args.quiet = True
    runner = executor(logs, slurm, max_timeouts=0)
    with runner.batch():
        jobs = [runner.submit(IngestSlice(args, (task, args.tasks))) for task in tasks]
    array_id = jobs[0].job_id.split("_")[0]
    final = executor(logs, slurm, max_timeouts=0)
    final.update_parameters(slurm_additional_parameters={**slurm.extra_sbatch, "dependency": f"afterok:{array_id}"})
    return [job.job_id for job in jobs], final.submit(IngestSlice(args, None)).job_id
