"""A run directory is one run's at a time and holds one lineage: resume=PATH names where a run starts (the same
command continues it), branching never loses or mixes records, a second run on it is refused, and the
launchers check what the trainer checks before they write anything."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys

import pytest

from pixelflow.errors import EXIT_STOPPED, EXIT_USER_ERROR, ConfigError
from pixelflow.train.trainer import train
from pixelflow.weights import committed_checkpoints, export
from tests.conftest import REPO, cli, error_lines, tiny_config, tiny_overrides
from tests.test_checkpoint import snapshot
from tests.test_distributed import ENV
from tests.test_fault_tolerance import kill_tree, logged_step, wait_for


def steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def losses(path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def checkpoint_names(run_dir) -> list[str]:
    return [p.name for p in committed_checkpoints(run_dir / "checkpoints")]


def test_resume_to_an_older_step_branches_moving_the_newer_lineage_aside(tmp_path, shapes_dataset):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, shapes_dataset))  # 6 steps, checkpoints at 3 and 6
    first = losses(run_dir / "metrics.jsonl")
    start = run_dir / "checkpoints" / "step_00000003"
    branch = ["train.steps=8", "checkpoint.keep=1", f"resume={start}"]
    train(tiny_config(run_dir, shapes_dataset, *branch))
    # the start point survives keep=1; step 6 of the abandoned lineage is archived, not chosen, not lost
    assert checkpoint_names(run_dir) == ["step_00000003", "step_00000008"]
    [archive] = (run_dir / "archive").iterdir()
    assert checkpoint_names(archive) == ["step_00000006"]
    assert steps(archive / "metrics.jsonl") == [4, 5, 6] and losses(archive / "metrics.jsonl") == first[3:]
    assert steps(run_dir / "metrics.jsonl") == list(range(1, 9))
    assert losses(run_dir / "metrics.jsonl")[:6] == first  # the branch retrains steps 4-6 as the first did
    # the same command again continues the branch (no second archive), and auto-resume does too
    train(tiny_config(run_dir, shapes_dataset, *branch[:-1], "train.steps=10", f"resume={start}"))
    train(tiny_config(run_dir, shapes_dataset, "train.steps=11", "checkpoint.keep=1"))
    assert len(list((run_dir / "archive").iterdir())) == 1
    assert steps(run_dir / "metrics.jsonl") == list(range(1, 12))
    assert checkpoint_names(run_dir) == ["step_00000003", "step_00000011"]


def test_an_export_into_a_used_run_directory_archives_its_lineage_and_overwrites_nothing(tmp_path, shapes_dataset):
    source = train(tiny_config(tmp_path / "source", shapes_dataset, "train.steps=3")).run_dir
    weights = export(source, tmp_path / "export")
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "seed=5")).run_dir  # another run: 3, 6
    before = snapshot(run_dir / "checkpoints")
    old_metrics = (run_dir / "metrics.jsonl").read_text()
    train(tiny_config(run_dir, shapes_dataset, f"resume={weights}", "train.steps=3"))
    [archive] = (run_dir / "archive").iterdir()
    assert snapshot(archive / "checkpoints") == before  # byte for byte, moved aside
    assert (archive / "metrics.jsonl").read_text() == old_metrics
    assert checkpoint_names(run_dir) == ["step_00000003"]
    assert steps(run_dir / "metrics.jsonl") == [1, 2, 3]


@pytest.mark.slow
def test_resume_from_a_path_continues_the_runs_own_checkpoints_after_each_stop(tmp_path, shapes_dataset):
    """resume=EXPORT through `pixelflow-launch local`, stopped with SIGTERM twice: each start after the first
    continues from the run's own newest checkpoint (not the export at step 0) and metrics hold every step once."""
    source = train(tiny_config(tmp_path / "source", shapes_dataset, "train.steps=3")).run_dir
    weights = export(source, tmp_path / "export")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        run_dir, shapes_dataset, f"resume={weights}", "train.steps=5000", "checkpoint.every=1000"
    )
    command = [sys.executable, "-m", "launch", "local", "configs/demo.yaml", *overrides]
    stopped_at = []
    for _ in range(2):
        logs = tmp_path / f"start{len(stopped_at)}.log"
        with open(logs, "w") as log:
            job = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log, env=ENV)
        try:
            wait_for(lambda: logged_step(run_dir) >= (stopped_at[-1] if stopped_at else 0) + 3, "three more steps")
            job.send_signal(signal.SIGTERM)
            assert job.wait(timeout=120) == EXIT_STOPPED
        finally:
            kill_tree(job.pid)
        stopped_at.append(logged_step(run_dir))
        assert checkpoint_names(run_dir)[-1] == f"step_{stopped_at[-1]:08d}"
    second = (tmp_path / "start1.log").read_text()
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at[0]:08d} at step {stopped_at[0]}" in second
    assert "continuing from its own checkpoints" in second
    assert steps(run_dir / "metrics.jsonl") == list(range(1, stopped_at[1] + 1))
    assert not (run_dir / "archive").exists()


def start_training(run_dir, data, log_path, *extra) -> subprocess.Popen:
    overrides = tiny_overrides(run_dir, data, "train.steps=5000", "checkpoint.every=2", *extra)
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pixelflow", "train", "configs/demo.yaml", *overrides],
            cwd=REPO,
            stdout=log,
            stderr=log,
            env=ENV,
            start_new_session=True,
        )


@pytest.mark.slow
def test_a_second_run_on_a_run_directory_is_refused_naming_the_holder_and_a_dead_holder_blocks_nothing(
    tmp_path, shapes_dataset
):
    run_dir = tmp_path / "run"
    first = start_training(run_dir, shapes_dataset, tmp_path / "first.log")
    try:
        wait_for(lambda: logged_step(run_dir) >= 3, "the first run's step 3")
        config_before = (run_dir / "config.yaml").read_text()
        overrides = tiny_overrides(run_dir, shapes_dataset, "train.steps=5000", "checkpoint.every=2")
        second = cli("pixelflow", "train", "configs/demo.yaml", *overrides, timeout=120)
        assert second.returncode == EXIT_USER_ERROR
        [line] = error_lines(second.stderr)
        assert line.startswith(f"pixelflow: error: run_dir {run_dir}: in use by another run (pid {first.pid} on ")
        launched = cli("launch", "local", "configs/demo.yaml", *overrides, timeout=120)  # the launcher checks too
        assert launched.returncode == EXIT_USER_ERROR and "in use by another run" in launched.stderr
        assert (run_dir / "config.yaml").read_text() == config_before
        assert first.poll() is None  # untouched, still training
        reached = logged_step(run_dir)
        wait_for(lambda: logged_step(run_dir) >= reached + 2, "the first run to go on")
    finally:
        kill_tree(first.pid)  # SIGKILL: its lock file stays behind, its lock does not
    logged = steps(run_dir / "metrics.jsonl")
    assert logged == list(range(1, len(logged) + 1))  # one run's records, none mixed in
    newest = int(checkpoint_names(run_dir)[-1][5:])
    overrides = tiny_overrides(run_dir, shapes_dataset, f"train.steps={newest + 2}")
    restarted = cli("pixelflow", "train", "configs/demo.yaml", *overrides)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert f"resumed from {run_dir}/checkpoints/step_{newest:08d}" in restarted.stderr


def test_launchers_check_what_the_trainer_checks_before_writing_anything(tmp_path, shapes_dataset):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3")).run_dir
    before = snapshot(run_dir)
    refused = cli("launch", "local", "configs/demo.yaml", *tiny_overrides(run_dir, shapes_dataset, "resume=none"))
    assert refused.returncode == EXIT_USER_ERROR
    assert error_lines(refused.stderr, "pixelflow-launch") == [
        f"pixelflow-launch: error: {run_dir}/checkpoints: resume=none but the run directory already holds "
        f"checkpoints (newest step_00000003); use another run_dir or resume=auto"
    ]
    assert snapshot(run_dir) == before  # config.yaml and code_version.json not rewritten
    for command in ("local", "submit"):
        fresh = tmp_path / f"fresh-{command}"
        done = cli("launch", command, "configs/demo.yaml", *tiny_overrides(fresh, tmp_path / "no-data"))
        assert done.returncode == EXIT_USER_ERROR
        assert error_lines(done.stderr, "pixelflow-launch") == [
            f"pixelflow-launch: error: {tmp_path}/no-data/manifest.json: no manifest; is this a dataset written "
            f"by pixelflow-data?"
        ]
        assert not fresh.exists()


def test_config_changes_on_resume_are_logged_and_a_lane_change_is_refused(tmp_path, shapes_dataset, caplog):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3")).run_dir
    with caplog.at_level(logging.WARNING, logger="pixelflow.train.trainer"):
        train(tiny_config(run_dir, shapes_dataset, "train.steps=4", "train.lr=0.002"))
    [line] = [r.getMessage() for r in caplog.records if "config differs" in r.getMessage()]
    assert line == "config differs from the checkpoint's: train.lr: 0.001 -> 0.002; train.steps: 3 -> 4"
    before = snapshot(run_dir)
    with pytest.raises(ConfigError) as error:
        train(tiny_config(run_dir, shapes_dataset, "train.steps=6", "data.lanes=4"))
    assert str(error.value) == (
        f"data.lanes = 4 but {run_dir}/checkpoints/step_00000004 reads {shapes_dataset} through 6 lanes, fixed at "
        f"the run's first start (they fix the global batches): keep data.lanes = 6 (or 0), or start a new run_dir"
    )
    assert snapshot(run_dir) == before
