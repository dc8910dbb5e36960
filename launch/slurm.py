"""Submitting training to SLURM through submitit, and reading a run's jobs back.

Everything of a run lives in its run directory: config.yaml, code_version.json, metrics, checkpoints, and
`slurm/`: one submitit folder per job id (`slurm/<job id>/<job id>_<task>_log.out`, appended across
requeues, never truncated), `jobs.jsonl` (every job submitted for the run) and `requeues.jsonl`.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import submitit

from launch.job import TrainJob
from launch.run_dir import code_version, last_metrics, prepare
from pixelflow.config import URL_CREDENTIALS, Config, SlurmConfig, to_yaml
from pixelflow.records import read_records
from pixelflow.weights import committed_checkpoints

JOBS = "jobs.jsonl"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "CONFIGURING", "COMPLETING", "RESIZING", "REQUEUE_HOLD"}


class LaunchError(RuntimeError):
    """A launcher problem phrased as one line for the user."""


def executor(folder: Path, slurm: SlurmConfig, max_timeouts: int | None = None) -> submitit.AutoExecutor:
    """A SLURM executor for the given options (submitit's own requeue budget for its USR2 path)."""
    budget = slurm.max_timeout_requeues if max_timeouts is None else max_timeouts
    runner = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm", slurm_max_num_timeout=budget)
    extra = dict(slurm.extra_sbatch)
    if slurm.account:
        extra["account"] = slurm.account
    parameters = {
        "nodes": slurm.nodes,
        "tasks_per_node": slurm.tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "timeout_min": slurm.time_min,
        "name": slurm.job_name,
        "slurm_signal_delay_s": slurm.signal_delay_s,
        "slurm_additional_parameters": extra,
        "slurm_srun_args": ["--open-mode=append"],
        "slurm_setup": list(slurm.setup),
    }
    optional = {
        "gpus_per_node": slurm.gpus_per_node or None,
        "mem_gb": slurm.mem_gb or None,
        "slurm_partition": slurm.partition,
        "slurm_qos": slurm.qos,
        "slurm_constraint": slurm.constraint,
        "slurm_exclusive": True if slurm.exclusive else None,
    }
    parameters.update({key: value for key, value in optional.items() if value is not None})
    runner.update_parameters(**parameters)
    return runner


def submit(cfg: Config) -> tuple[str, Path]:
    """Submit the training job of cfg (run_dir made absolute); returns (job id, run directory)."""
    from_environment = "data.endpoint_url" in getattr(cfg, "_env_interpolations", {})
    if cfg.data.endpoint_url and URL_CREDENTIALS.search(cfg.data.endpoint_url) and not from_environment:
        raise LaunchError(
            "data.endpoint_url holds a password, which is never written to disk: give it as "
            "${oc.env:VARIABLE} so that the job reads it from its environment"
        )
    run_dir = prepare(cfg)
    job = executor(run_dir / "slurm", cfg.slurm).submit(TrainJob(to_yaml(cfg)))
    record(run_dir, job.job_id, "train")
    return job.job_id, run_dir


def record(run_dir: Path, job_id: str, kind: str) -> None:
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    with open(slurm_dir / JOBS, "a") as handle:
        handle.write(json.dumps({"job": job_id, "kind": kind, "code": code_version()}) + "\n")


def run_jobs(run_dir: Path) -> list[str]:
    path = run_dir / "slurm" / JOBS
    if not path.exists():
        raise LaunchError(f"{run_dir}: no jobs were submitted for this run directory (no slurm/{JOBS})")
    return [record["job"] for record in read_records(path)]


def _command(*args: str) -> str:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError(f"{args[0]}: not found; is this a SLURM login node?") from None
    return done.stdout if done.returncode == 0 else ""


@dataclass
class JobState:
    job_id: str
    state: str
    restarts: int
    run_dir: Path | None
    reason: str = "None"  # why a pending job waits (scontrol's Reason)


def job_state(job_id: str) -> JobState:
    """State from scontrol while SLURM remembers the job, else from sacct (accounting)."""
    shown = _command("scontrol", "show", "job", "-o", job_id)
    if shown:
        fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
        stdout = fields.get("StdOut", "")
        run_dir = Path(stdout).parent.parent.parent if "/slurm/" in stdout else None
        state, restarts = fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", 0))
        return JobState(job_id, state, restarts, run_dir, fields.get("Reason", "None"))
    lines = [
        line for line in _command("sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State").splitlines() if line
    ]
    if not lines:
        raise LaunchError(f"job {job_id}: unknown to SLURM (squeue and sacct)")
    return JobState(job_id, lines[-1].split()[0], len(lines) - 1, None)


def status(target: str) -> str:
    """What `pixelflow-launch status RUN_DIR|JOB_ID` prints."""
    run_dir = Path(target) if Path(target).is_dir() else None
    state = job_state(run_jobs(run_dir)[-1] if run_dir else target)
    run_dir = run_dir or state.run_dir
    waiting = f", waiting: {state.reason}" if state.state == "PENDING" and state.reason != "None" else ""
    lines = [f"job {state.job_id}: {state.state} (requeued {state.restarts} times{waiting})"]
    if run_dir is not None:
        lines.append(f"run directory: {run_dir}")
        metrics = last_metrics(run_dir)
        lines.append(
            f"last logged step: {metrics['step']}, loss {metrics['loss']:.4f}" if metrics else "last logged step: none"
        )
        committed = committed_checkpoints(run_dir / "checkpoints")
        lines.append(f"newest committed checkpoint: {committed[-1].name if committed else 'none'}")
    return "\n".join(lines)


def cancel(target: str) -> list[str]:
    """Cancel a job, or every active job of a run directory; returns the job ids cancelled."""
    jobs = run_jobs(Path(target)) if Path(target).is_dir() else [target]
    active = [job for job in jobs if job_state(job).state.split()[0] in ACTIVE]
    if active:
        subprocess.run(["scancel", *active], check=True)
    return active


def tail(run_dir: Path, rank: int, lines: int = 40) -> str:
    """The end of the newest job's log of one rank (task)."""
    job = run_jobs(run_dir)[-1]
    log = run_dir / "slurm" / job / f"{job}_{rank}_log.out"
    if not log.exists():
        raise LaunchError(f"{log}: no log yet (job pending, or no task {rank})")
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
