"""Surviving what happens to real jobs, with real processes on CPU (gloo): SIGKILL at any moment, stop signals
to all ranks or one, and resuming on another layout (reshard)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.distributed.checkpoint as dcp

from pixelflow.config import DataConfig
from pixelflow.data.loader import LaneReader, ReadSettings
from pixelflow.data.shard_format import read_manifest
from pixelflow.data.storage import filesystem
from pixelflow.errors import EXIT_STOPPED
from pixelflow.weights import committed_checkpoints
from tests.conftest import REPO, tiny_overrides
from tests.s3 import free_port
from tests.test_distributed import ENV

pytestmark = pytest.mark.slow
TWO_RANKS = ["parallel.dp_shard=2", "checkpoint.every=2", "data.lanes=4"]


def train_args(run_dir: Path, data: Path, steps: int, *extra: str) -> list[str]:
    overrides = tiny_overrides(run_dir, data, f"train.steps={steps}", *TWO_RANKS, *extra)
    return ["-m", "pixelflow", "train", "configs/demo.yaml", *overrides]


def torchrun(procs: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]


def start_torchrun(args: list[str], procs: int = 2) -> subprocess.Popen:
    """torchrun with `procs` ranks in the background, quiet, in a session of its own (for kill_tree)."""
    command = torchrun(procs) + ["--master_port", str(free_port())] + args
    return subprocess.Popen(
        command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def run_to_end(args: list[str], procs: int = 2) -> None:
    done = subprocess.run(
        torchrun(procs) + ["--master_port", str(free_port())] + args,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts its ranks in sessions of their own,
    so killing its process group would leave them running)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


def read_all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, full, read in this one process."""
    reader = dcp.FileSystemReader(str(folder))
    metadata = reader.read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(list(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if hasattr(meta, "size")
    }
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shapes_dataset) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_to_end(train_args(run_dir, shapes_dataset, 8))
    return run_dir


@pytest.mark.parametrize("moment", ["between_steps", "sync_save", "async_save"])
def test_sigkill_at_any_moment_then_the_same_command_continues_the_same_trajectory(
    tmp_path, shapes_dataset, uninterrupted, moment
):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, shapes_dataset, 8, f"checkpoint.async_save={moment == 'async_save'}")
    first = args if moment == "between_steps" else ["-m", "tests.stalled_commit", "4:600", *args[2:]]
    job = start_torchrun(first)  # stalled: step 4's save has all its files written, its commit held back
    stalled = run_dir / "checkpoints" / ".step_00000004.tmp"
    try:
        if moment == "between_steps":
            wait_for(lambda: logged_step(run_dir) >= 5, "step 5")
        elif moment == "sync_save":
            wait_for(lambda: (stalled / ".crc-1.json").exists(), "step 4's save to be written")
        else:  # the step loop runs on while the save is in flight
            wait_for(lambda: logged_step(run_dir) >= 5 and (stalled / ".crc-1.json").exists(), "step 5 during the save")
        kill_tree(job.pid)
    finally:
        kill_tree(job.pid)
        job.wait()
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    committed = [p.name for p in committed_checkpoints(run_dir / "checkpoints")]
    if moment != "between_steps":
        assert committed == ["step_00000002"] and stalled.is_dir()  # written but never committed
    run_to_end(args)
    assert losses(run_dir) == losses(uninterrupted)
    assert not stalled.exists()  # the stale temporary is gone after the next commit
    final, expected = (
        read_all_tensors(run_dir / "checkpoints" / "step_00000008"),
        read_all_tensors(uninterrupted / "checkpoints" / "step_00000008"),
    )
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def start_ranks(args: list[str], procs: int, logs: Path) -> list[subprocess.Popen]:
    """The ranks as separate processes without torchrun, each in its own session, as srun starts tasks."""
    port = str(free_port())
    ranks = []
    for rank in range(procs):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(procs))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with open(logs / f"rank{rank}.log", "w") as log:
            ranks.append(
                subprocess.Popen(
                    [sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True
                )
            )
    return ranks


@pytest.mark.parametrize("signalled", ["every rank", "one rank"])
def test_sigterm_stops_all_ranks_after_the_same_step_with_a_committed_checkpoint(tmp_path, shapes_dataset, signalled):
    steps = 24
    extra = ["checkpoint.every=100", "data.num_workers=1"]  # workers get the signal too (whole process group)
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    run_to_end(train_args(whole, shapes_dataset, steps, *extra))
    args = train_args(run_dir, shapes_dataset, steps, *extra)
    ranks = start_ranks(args, 2, tmp_path)
    try:
        wait_for(lambda: logged_step(run_dir) >= 3, "step 3")
        targets = ranks if signalled == "every rank" else ranks[1:]
        for _ in range(2):  # the second signal lands during the stop or the save and changes nothing
            for rank in targets:
                os.killpg(rank.pid, signal.SIGTERM) if signalled == "every rank" else rank.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        codes = [rank.wait(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, signal.SIGKILL)
    assert codes == [EXIT_STOPPED, EXIT_STOPPED]
    stopped_at = logged_step(run_dir)
    assert 3 <= stopped_at < steps
    assert [p.name for p in committed_checkpoints(run_dir / "checkpoints")] == [f"step_{stopped_at:08d}"]
    for rank in range(2):
        log = (tmp_path / f"rank{rank}.log").read_text()
        assert f"stopped by SIGTERM (exit 75: resume with the same command) at step {stopped_at}" in log
    run_to_end(args)
    assert losses(run_dir) == losses(whole)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, shapes_dataset) -> Path:
    run_dir = tmp_path_factory.mktemp("two_ranks") / "run"
    run_to_end(train_args(run_dir, shapes_dataset, 6, "train.log_sample_keys=true"))
    return run_dir


def lane_keys(data: Path, lanes: int, cursors: list[int]) -> list[str]:
    """The keys each lane yields before its cursor: what a run must have trained on, each exactly once."""
    fs, root = filesystem(str(data))
    settings = ReadSettings(
        DataConfig(path=str(data), resolution=32, shuffle_block=16), read_manifest(fs, root), lanes, 0
    )
    keys = []
    for lane, cursor in enumerate(cursors):
        samples = LaneReader(settings, lane).samples(0)
        keys += [next(samples).key for _ in range(cursor)]
    return keys


@pytest.mark.parametrize(
    "procs, layout",
    [(1, ["parallel.dp_shard=1"]), (4, ["parallel.dp_shard=4"]), (4, ["parallel.dp_shard=2", "parallel.sp=2"])],
    ids=["1-rank", "4-ranks", "dp2-x-sp2"],
)
def test_a_two_rank_checkpoint_reshards_exactly_and_training_continues(
    tmp_path, shapes_dataset, two_rank_run, procs, layout
):
    saved = two_rank_run / "checkpoints" / "step_00000006"
    out = tmp_path / "reloaded"
    overrides = tiny_overrides(tmp_path / "unused", shapes_dataset, *TWO_RANKS, *layout)
    command = [str(REPO / "tests" / "distributed_harness.py"), "reload", str(out), "configs/demo.yaml", str(saved)]
    if procs == 1:
        done = subprocess.run([sys.executable, *command, *overrides], capture_output=True, text=True, cwd=REPO, env=ENV)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        run_to_end(command + overrides, procs)
    before, after = read_all_tensors(saved), read_all_tensors(out / "step_00000006")
    assert before.keys() == after.keys() and len(before) > 0
    assert [k for k in before if not torch.equal(before[k], after[k])] == []  # model, EMA, optimizer, exactly
    assert json.loads((saved / "state.json").read_text()) == json.loads(
        (out / "step_00000006" / "state.json").read_text()
    )

    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_run, run_dir)
    run_to_end(train_args(run_dir, shapes_dataset, 9, "train.log_sample_keys=true", *layout), procs)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()] == list(range(1, 10))
    trained = []
    for log in (run_dir / "sample_keys").glob("*.jsonl"):
        trained += [key for line in log.open() for key in json.loads(line)["keys"]]
    data_state = json.loads((run_dir / "checkpoints" / "step_00000009" / "state.json").read_text())["train"]["data"]
    assert len(trained) == 9 * 8
    assert sorted(trained) == sorted(lane_keys(shapes_dataset, 4, data_state["sources"][0]["positions"]))
    assert np.unique(trained).size == len(trained)  # 72 of 192 samples: within one epoch, none twice


def test_more_data_ranks_than_lanes_train_like_one_process(tmp_path, shapes_dataset):
    """Two lanes, four data ranks: two ranks read nothing and get their samples through the exchange."""
    one, four = tmp_path / "one", tmp_path / "four"
    run_to_end(train_args(one, shapes_dataset, 3, "parallel.dp_shard=1", "data.lanes=2"), 1)
    done = subprocess.run(
        torchrun(4)
        + ["--master_port", str(free_port())]
        + train_args(four, shapes_dataset, 3, "parallel.dp_shard=4", "data.lanes=2"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 reading lanes for 4 data ranks: 2 ranks read nothing" in done.stderr
    want = losses(one)
    assert len(want) == 3 and all(abs(a - b) <= 1e-5 * b for a, b in zip(losses(four), want))


def test_local_launcher_forwards_sigterm_and_keeps_the_resume_exit_status(tmp_path, shapes_dataset):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, shapes_dataset, "train.steps=5000", "checkpoint.every=1000")
    job = subprocess.Popen(
        [sys.executable, "-m", "launch", "local", "configs/demo.yaml", *overrides, "--nproc", "2"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: logged_step(run_dir) >= 3, "step 3")
        job.send_signal(signal.SIGTERM)  # to the launcher only: it passes the signal on to every rank
        assert job.wait(timeout=120) == EXIT_STOPPED
    finally:
        kill_tree(job.pid)
    assert [p.name for p in committed_checkpoints(run_dir / "checkpoints")] == [f"step_{logged_step(run_dir):08d}"]
