"""The launcher against a real single-node SLURM (launch/local_slurm.sh: munge, slurmctld, slurmd, slurmdbd):
submit, real preemption, time limits, cancel, array ingest; and the same job in local mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import REPO, tiny_overrides
from tests.test_s3_data import photo, save

pytestmark = pytest.mark.slow
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
TWO_TASKS = ["slurm.tasks_per_node=2", "slurm.cpus_per_task=1", "slurm.mem_gb=1"]


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running local SLURM for this module: started here (and stopped afterwards) unless already up."""
    script = ["bash", str(REPO / "launch" / "local_slurm.sh")]
    if subprocess.run(script + ["status"], capture_output=True).returncode == 0:
        yield
        return
    started = subprocess.run(script + ["start"], capture_output=True, text=True, timeout=900)
    if started.returncode == 3:
        pytest.skip(f"no SLURM on this machine: {started.stderr.strip()}")
    assert started.returncode == 0, started.stderr
    try:
        yield
    finally:
        subprocess.run(script + ["stop"], capture_output=True, timeout=300)


def launch(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=REPO)
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


def submit(run_dir: Path, data: Path, *extra: str) -> str:
    overrides = tiny_overrides(run_dir, data, *TWO_TASKS, *extra)
    done = launch("submit", "configs/demo.yaml", *overrides)
    assert done.stdout.splitlines()[1] == f"run directory: {run_dir}"
    return done.stdout.splitlines()[0].split()[-1]


def state_of(target: str) -> str:
    return launch("status", target).stdout.splitlines()[0].split(": ")[1].split()[0]


def wait_for(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def wait_final(target: str, timeout: float = 300) -> str:
    wait_for(lambda: state_of(target) in FINAL, f"{target} to end", timeout)
    return state_of(target)


def logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def processes_of(run_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names the run directory (job tasks, their data workers, srun)."""
    found = []
    for process in psutil.process_iter(["cmdline", "pid"]):
        command = " ".join(process.info["cmdline"] or [])
        if str(run_dir) in command and process.info["pid"] != os.getpid():
            found.append(process)
    return found


def requeues(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm" / "requeues.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_submitted_job_trains_to_the_end_and_status_reads_completed(tmp_path, shapes_dataset, slurm_cluster):
    run_dir = tmp_path / "run"
    job = submit(run_dir, shapes_dataset)
    assert wait_final(job, 180) == "COMPLETED"
    report = launch("status", str(run_dir)).stdout.splitlines()
    assert report[0] == f"job {job}: COMPLETED (requeued 0 times)"
    assert report[2].startswith("last logged step: 6, loss ")
    assert report[3] == "newest committed checkpoint: step_00000006"
    assert [r["step"] for r in logged(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert {"git_commit", "dirty"} <= json.loads((run_dir / "code_version.json").read_text()).keys()
    logs = run_dir / "slurm" / job
    assert (logs / f"{job}_0_log.out").exists() and (logs / f"{job}_1_log.out").exists()
    assert "step=6" in launch("tail", str(run_dir), "--rank", "0").stdout


def test_preempted_job_saves_requeues_resumes_and_matches_an_uninterrupted_run(tmp_path, shapes_dataset, slurm_cluster):
    steps = ["train.steps=150", "checkpoint.every=50"]
    reference = tmp_path / "reference"  # the same 2-rank job in local mode, uninterrupted
    local = launch("local", "configs/demo.yaml", *tiny_overrides(reference, shapes_dataset, *steps), "--nproc", "2")
    assert local.returncode == 0
    run_dir = tmp_path / "run"
    job = submit(run_dir, shapes_dataset, *steps, "slurm.partition=low", "slurm.cpus_per_task=2")  # the whole node
    wait_for(lambda: len(logged(run_dir)) >= 30, "step 30", 120)
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-n", "1", "-o", str(tmp_path / "high.out"), "--wrap", "sleep 5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert wait_final(job, 240) == "COMPLETED"
    assert wait_final(high, 60) == "COMPLETED"  # the preempting job ran meanwhile
    [requeue] = requeues(run_dir)
    assert requeue["reason"] == "preemption" and 30 <= requeue["step"] < 150
    assert launch("status", str(run_dir)).stdout.splitlines()[0] == f"job {job}: COMPLETED (requeued 1 times)"
    log = "".join((run_dir / "slurm" / job / f"{job}_0_log.{kind}").read_text() for kind in ("out", "err"))
    assert (
        f"resumed from {run_dir}/checkpoints/step_{requeue['step']:08d} at step {requeue['step']}" in log
    )  # none lost
    assert log.count("Starting with JobEnvironment") == 2  # the logs of both runs, appended
    assert [r["loss"] for r in logged(run_dir)] == [r["loss"] for r in logged(reference)]


def test_time_limited_job_is_requeued_until_it_completes(tmp_path, shapes_dataset, slurm_cluster):
    run_dir = tmp_path / "run"
    limits = ["slurm.time_min=1", "slurm.signal_delay_s=15", "slurm.cpus_per_task=2", "train.log_every=50"]
    job = submit(run_dir, shapes_dataset, "train.steps=500", "checkpoint.every=100", *limits)
    assert wait_final(job, 600) == "COMPLETED"
    reasons = [entry["reason"] for entry in requeues(run_dir)]
    assert len(reasons) >= 2 and set(reasons) == {"time limit"}
    assert logged(run_dir)[-1]["step"] == 500


def test_cancel_stops_the_job_and_leaves_no_process(tmp_path, shapes_dataset, slurm_cluster):
    run_dir = tmp_path / "run"
    job = submit(run_dir, shapes_dataset, "train.steps=5000", "data.num_workers=1")
    wait_for(lambda: len(logged(run_dir)) >= 5, "step 5", 120)
    assert launch("cancel", str(run_dir)).stdout.strip() == f"cancelled {job}"
    assert wait_final(job, 60) == "CANCELLED"
    wait_for(lambda: not processes_of(run_dir), "the job's processes to exit", 30)
    assert requeues(run_dir) == []
    assert launch("cancel", str(run_dir)).stdout.startswith("nothing to cancel")


def test_array_ingest_writes_what_a_local_ingest_writes(tmp_path, slurm_cluster):
    images = tmp_path / "images"
    for i in range(36):
        save(images / f"class{i % 3}" / f"img{i:03d}.jpg", photo(i, size=(96, 80)))
    save(images / "class0" / "tiny.jpg", photo(99, size=(20, 20)))
    (images / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
    options = ["--per-shard", "4", "--quiet"]
    local = subprocess.run(
        [sys.executable, "-m", "data_tools", "ingest", str(images), str(tmp_path / "local"), *options],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert local.returncode == 0, local.stderr
    report = tmp_path / "array-report.json"
    done = launch(
        "ingest",
        str(images),
        str(tmp_path / "array"),
        *options,
        "--tasks",
        "4",
        "--report",
        str(report),
        "--logs",
        str(tmp_path / "logs"),
    )
    final = done.stdout.splitlines()[1].split()[3]
    assert len(done.stdout.splitlines()[0].split()) == 3 + 4  # "submitted array tasks" + 4 ids
    assert wait_final(final, 240) == "COMPLETED"

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(tmp_path / "array") == files(tmp_path / "local")  # shards, indexes, manifest: same bytes
    counts = ("inputs", "written", "skipped", "converted", "shards")
    expected = json.loads(local.stdout)
    merged = json.loads(report.read_text())
    assert {k: merged[k] for k in counts} == {k: expected[k] for k in counts}
    assert merged["written"] == 36 and sum(merged["skipped"].values()) == 2  # the tiny and the broken file


def test_array_index_writes_what_a_local_index_writes(tmp_path, slurm_cluster):
    from data_tools.index import index_dataset
    from tests.test_index import write_tars

    write_tars(str(tmp_path / "tars"), labels=True)
    expected = index_dataset(str(tmp_path / "tars"), str(tmp_path / "local"))
    logs = ["--logs", str(tmp_path / "logs"), "--report", str(tmp_path / "report.json")]
    done = launch("index", str(tmp_path / "tars"), "--meta", str(tmp_path / "array"), "--tasks", "3", *logs)
    assert wait_final(done.stdout.splitlines()[1].split()[3], 240) == "COMPLETED"
    for name in ["manifest.json", *(f"part-{i:03d}.index.json" for i in range(4))]:
        local, array = (json.loads((tmp_path / where / name).read_text()) for where in ("local", "array"))
        assert local == array, name  # the manifest names the tars' folder as their location in both
    merged = json.loads((tmp_path / "report.json").read_text())
    assert merged["written"] == expected.written == 48 and merged["shards_reused"] == 4  # the final step reuses


def test_array_encode_text_writes_what_a_local_encode_writes(tmp_path, shapes_dataset, slurm_cluster):
    from data_tools.text import encode_text, tiny_text_encoder

    encoder = tiny_text_encoder(str(shapes_dataset), str(tmp_path / "t5"), dim=8)
    encode_text(str(shapes_dataset), encoder, str(tmp_path / "local"), progress=False)
    done = launch(
        "encode-text",
        str(shapes_dataset),
        "--encoder",
        encoder,
        "--out",
        str(tmp_path / "array"),
        "--tasks",
        "3",
        "--logs",
        str(tmp_path / "logs"),
    )
    jobs = done.stdout.split()[3:]
    assert len(jobs) == 3
    assert [wait_final(job, 240) for job in jobs] == ["COMPLETED"] * 3

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert len(files(tmp_path / "local")) == 2 + 2 * 6  # encoder info, empty caption, 6 shards x (data, index)
    assert files(tmp_path / "array") == files(tmp_path / "local")


def test_array_eval_draws_the_images_one_process_draws(tmp_path, shapes_dataset, slurm_cluster):
    from pixelflow.train.trainer import train
    from tests.conftest import tiny_config

    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=2")).run_dir
    options = ["--checkpoint", str(run_dir), "--images", "7", "--batch", "2", "--steps", "2", "--device", "cpu"]
    local = subprocess.run(
        [sys.executable, "-m", "pixelflow", "eval", "--out", str(tmp_path / "local"), *options],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert local.returncode == 0, local.stderr
    done = launch("eval", *options, "--out", str(tmp_path / "array"), "--tasks", "3", "--logs", str(tmp_path / "logs"))
    final = done.stdout.splitlines()[1].split()[3]
    assert wait_final(final, 240) == "COMPLETED"
    drawn = [json.loads(line) for path in (tmp_path / "array").glob("written_rank_*.jsonl") for line in path.open()]
    assert sorted(record["index"] for record in drawn) == list(range(7))  # each index once, over 3 tasks
    assert {record["rank"] for record in drawn} == {0, 1, 2}
    with np.load(tmp_path / "local" / "samples_7.npz") as one, np.load(tmp_path / "array" / "samples_7.npz") as array:
        assert np.array_equal(one["arr_0"], array["arr_0"]) and np.array_equal(one["labels"], array["labels"])


def test_a_preempted_job_started_from_a_path_continues_from_its_own_checkpoint(tmp_path, shapes_dataset, slurm_cluster):
    """resume=EXPORT names where the run starts: the requeued job continues from the run's own newest
    checkpoint, not from the export at step 0, and metrics hold every step once."""
    from pixelflow.train.trainer import train
    from pixelflow.weights import export
    from tests.conftest import tiny_config

    source = train(tiny_config(tmp_path / "source", shapes_dataset, "train.steps=2")).run_dir
    weights = export(source, tmp_path / "export")
    run_dir = tmp_path / "run"
    steps = ["train.steps=120", "checkpoint.every=40", f"resume={weights}"]
    job = submit(run_dir, shapes_dataset, *steps, "slurm.partition=low", "slurm.cpus_per_task=2")
    wait_for(lambda: len(logged(run_dir)) >= 20, "step 20", 120)
    subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-n", "1", "-o", str(tmp_path / "high.out"), "--wrap", "sleep 5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert wait_final(job, 240) == "COMPLETED"
    [requeue] = requeues(run_dir)
    log = "".join((run_dir / "slurm" / job / f"{job}_0_log.{kind}").read_text() for kind in ("out", "err"))
    assert log.count(f"weights loaded from {weights} at step 0") == 1  # the first start only
    assert f"resumed from {run_dir}/checkpoints/step_{requeue['step']:08d} at step {requeue['step']}" in log
    assert [r["step"] for r in logged(run_dir)] == list(range(1, 121))
