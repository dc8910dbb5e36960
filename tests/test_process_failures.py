"""What happens to processes, with real processes: Ctrl-C, a rank that dies or hangs, a launcher killed with
SIGKILL, a disk that fills during a save. Each ends in one line and a known exit status, and the newest
committed checkpoint resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pixelflow.errors import EXIT_FAILED, EXIT_SIGNAL_BASE, EXIT_STOPPED
from pixelflow.weights import committed_checkpoints, verify
from tests.conftest import REPO, error_lines, tiny_overrides
from tests.s3 import free_port
from tests.test_distributed import ENV
from tests.test_fault_tolerance import kill_tree, logged_step, losses, run_to_end, train_args, wait_for

pytestmark = pytest.mark.slow
LONG = ["train.steps=5000", "checkpoint.every=1000"]


def launch_local(run_dir: Path, data: Path, log: Path, nproc: int, *extra: str, session: bool = True):
    overrides = tiny_overrides(run_dir, data, *extra)
    command = [sys.executable, "-m", "launch", "local", "configs/demo.yaml", *overrides, "--nproc", str(nproc)]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=out, stderr=out, start_new_session=session)


def ranks_of(run_dir: Path) -> list[psutil.Process]:
    """The trainer processes (not launchers) whose command line names the run directory's config."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        launcher = "torch.distributed.run" in command
        if "pixelflow" in command and "train" in command and str(run_dir) in " ".join(command) and not launcher:
            found.append(process)
    return found


def test_ctrl_c_to_the_local_launcher_stops_every_rank_like_sigterm(tmp_path, shapes_dataset):
    run_dir = tmp_path / "run"
    job = launch_local(run_dir, shapes_dataset, tmp_path / "log", 2, *LONG)
    try:
        wait_for(lambda: logged_step(run_dir) >= 3, "step 3")
        os.killpg(job.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        assert job.wait(timeout=120) == EXIT_STOPPED
    finally:
        kill_tree(job.pid)
    output = (tmp_path / "log").read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert f"stopped by SIGINT (exit 75: resume with the same command) at step {logged_step(run_dir)}" in output
    assert [p.name for p in committed_checkpoints(run_dir / "checkpoints")] == [f"step_{logged_step(run_dir):08d}"]


def test_a_dead_peer_is_one_line_and_the_launcher_reports_the_signal(tmp_path, shapes_dataset):
    run_dir = tmp_path / "run"
    job = launch_local(run_dir, shapes_dataset, tmp_path / "log", 2, *LONG)
    try:
        wait_for(lambda: logged_step(run_dir) >= 3 and len(ranks_of(run_dir)) == 2, "step 3")
        rank1 = next(p for p in ranks_of(run_dir) if p.environ().get("RANK") == "1")
        rank1.kill()
        assert job.wait(timeout=120) == EXIT_SIGNAL_BASE + signal.SIGKILL  # the first rank to fail: 137
    finally:
        kill_tree(job.pid)
    output = (tmp_path / "log").read_text()
    lines = error_lines(output)
    assert lines and lines[0].startswith("pixelflow: error: rank 0: lost the connection to another rank (it died")
    assert "internal error" not in output and "Traceback" not in output


@pytest.mark.parametrize("launcher", ["local", "torchrun"])
def test_ranks_die_with_their_launcher(tmp_path, shapes_dataset, launcher):
    run_dir = tmp_path / "run"
    if launcher == "local":
        job = launch_local(run_dir, shapes_dataset, tmp_path / "log", 2, *LONG)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        command += ["--master_port", str(free_port()), *train_args(run_dir, shapes_dataset, 5000)]
        with open(tmp_path / "log", "w") as out:
            job = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=out, stderr=out, start_new_session=True)
    try:
        wait_for(lambda: logged_step(run_dir) >= 3 and len(ranks_of(run_dir)) == 2, "step 3")
        job.kill()  # SIGKILL of the launcher alone: it can forward nothing
        job.wait()
        started = time.monotonic()
        wait_for(lambda: not ranks_of(run_dir), "every rank to exit", timeout=30)
        assert time.monotonic() - started < 10
    finally:
        kill_tree(job.pid)
        for rank in ranks_of(run_dir):
            rank.kill()


def test_a_hung_rank_ends_the_job_within_the_collective_timeout_and_the_rerun_resumes_exactly(tmp_path, shapes_dataset):
    timeout, steps = 15, 12
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    run_to_end(train_args(whole, shapes_dataset, steps))
    extra = [f"train.steps={steps}", "checkpoint.every=2", "parallel.dp_shard=2", "data.lanes=4"]
    extra.append(f"train.collective_timeout_s={timeout}")
    job = launch_local(run_dir, shapes_dataset, tmp_path / "log", 2, *extra, "train.log_every=1")
    try:
        wait_for(lambda: logged_step(run_dir) >= 4 and len(ranks_of(run_dir)) == 2, "step 4")
        rank1 = next(p for p in ranks_of(run_dir) if p.environ().get("RANK") == "1")
        rank1.suspend()  # SIGSTOP: alive, holding every collective
        stopped = time.monotonic()
        status = job.wait(timeout=timeout + 120)
        took = time.monotonic() - stopped
    finally:
        kill_tree(job.pid)
    assert status == EXIT_FAILED
    assert took < timeout + 30  # the timeout, then the launcher's 5 s grace and the kill of the stopped rank
    lines = error_lines((tmp_path / "log").read_text())
    assert lines[0].startswith(
        f"pixelflow: error: rank 0: a collective waited longer than train.collective_timeout_s = {timeout} s"
    )
    rerun = [*train_args(run_dir, shapes_dataset, steps), f"train.collective_timeout_s={timeout}"]
    run_to_end(rerun)
    assert losses(run_dir) == losses(whole)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs mounted for the test (root only) and unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays_intact(
    tmp_path, shapes_dataset, small_disk, mode
):
    run_dir = tmp_path / "run"  # its checkpoints on the small disk, as on a cluster's checkpoint volume
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(small_disk, target_is_directory=True)
    overrides = tiny_overrides(run_dir, shapes_dataset, "train.steps=60", "checkpoint.every=1", "checkpoint.keep=100")
    overrides.append(f"checkpoint.async_save={mode == 'async'}")
    command = [sys.executable, "-m", "pixelflow", "train", "configs/demo.yaml", *overrides]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == EXIT_FAILED, done.stderr[-2000:]
    [line] = error_lines(done.stderr)
    committed = committed_checkpoints(run_dir / "checkpoints")
    failed_step = int(committed[-1].name[5:]) + 1
    assert line.startswith(
        f"pixelflow: error: step {failed_step}: saving the checkpoint into {run_dir}/checkpoints failed: No space "
        f"left on device"
    )
    assert line.endswith(f"; the newest committed checkpoint, {committed[-1].name}, is intact")
    assert "Traceback" not in done.stderr
    verify(committed[-1])  # whole, checksums and all
    assert not list((run_dir / "checkpoints").glob(".step_*.tmp"))  # the failed save's files are gone
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] - failed_step in (0, 1)  # stopped at once: at the failing step or the next
