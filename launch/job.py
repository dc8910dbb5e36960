"""What runs inside every task of a submitted training job.

Each task joins the job's process group (submitit's TorchDistributedEnvironment: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR = first host, MASTER_PORT derived from the job id, so a requeued job meets at the
same rendezvous) and runs the trainer on the run directory, which resumes from its newest committed
checkpoint. The trainer stops all ranks after the same step on SIGTERM (preemption, scancel) or SIGUSR2
(`--signal=USR2@delay` before the time limit) and commits a checkpoint; then rank 0 asks SLURM to requeue:
after preemption always (a job whose tasks end within the grace time would otherwise count as completed),
after a time limit while `slurm.max_timeout_requeues` allows. SIGTERM from scancel is told apart from
preemption by the job's PreemptTime (measured on SLURM 22.05: RUNNING with a PreemptTime while preempted,
COMPLETING without one when cancelled), so a cancelled job stays cancelled.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import zlib
from pathlib import Path

import submitit

from pixelflow.config import from_yaml, redacting
from pixelflow.records import read_records
from pixelflow.train.signals import signal_numbers

log = logging.getLogger(__name__)
REQUEUE_LOG = "requeues.jsonl"  # in <run_dir>/slurm/: one line per requeue this job asked for


def master_port(job_id: str) -> int:
    """A port in 20000..59999 fixed by the job id (array tasks share their array's)."""
    return 20000 + zlib.crc32(job_id.split("_")[0].encode()) % 40000


def timeout_requeues(slurm_dir: Path) -> int:
    return sum(record["reason"] == "time limit" for record in read_records(slurm_dir / REQUEUE_LOG))


def preempted(job_id: str) -> bool:
    """Whether SLURM is preempting the job: SIGTERM also comes from scancel, which must not be undone
    (and `scontrol requeue` would even requeue a cancelled job)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
    return fields.get("JobState") == "RUNNING" and fields.get("PreemptTime", "None") != "None"


class TrainJob(submitit.helpers.Checkpointable):
    """The submitted callable: a resolved config (YAML text) to train."""

    def __init__(self, config_yaml: str):
        self.config_yaml = config_yaml

    def __call__(self) -> int:
        from pixelflow.train.trainer import train

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        environment = submitit.JobEnvironment()
        os.environ["MASTER_PORT"] = str(master_port(environment.job_id))
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cfg = from_yaml(self.config_yaml)
        with redacting(cfg):
            result = train(cfg)
        for number in signal_numbers(cfg.train.stop_signals):  # a late signal must not kill a task that is done
            signal.signal(number, signal.SIG_IGN)
        if result.stop_signal is not None and environment.global_rank == 0:
            self.requeue(
                environment.job_id, result.stop_signal, result.step, Path(cfg.run_dir), cfg.slurm.max_timeout_requeues
            )
        return result.exit_status

    def requeue(self, job_id: str, stop_signal: str, step: int, run_dir: Path, max_timeouts: int) -> None:
        reason = "time limit" if stop_signal == "SIGUSR2" else "preemption"
        slurm_dir = run_dir / "slurm"
        if reason == "preemption" and not preempted(job_id):
            log.info("job %s stopped by %s without preemption (scancel?): not requeued", job_id, stop_signal)
            return
        if reason == "time limit" and timeout_requeues(slurm_dir) >= max_timeouts:
            log.warning("stopped by the time limit %d times: not requeued (slurm.max_timeout_requeues)", max_timeouts)
            return
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if done.returncode != 0:  # cancelled, or finished meanwhile: nothing to continue
            log.info("job %s not requeued: %s", job_id, done.stderr.strip() or done.returncode)
            return
        record = {"job": job_id, "reason": reason, "step": step, "time": datetime.datetime.now().isoformat()}
        with open(slurm_dir / REQUEUE_LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        log.info("job %s requeued after %s at step %d", job_id, reason, step)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit's own USR2 path (a signal before the trainer's handlers are in place): the state is
        already on disk, so the requeued job is this same job."""
        return submitit.helpers.DelayedSubmission(self)
