"""Distributed training on CPU with real processes (torchrun, gloo): every layout trains like one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelflow.generate import generate, load_for_sampling
from tests.conftest import REPO, run_ranks, tiny_overrides
from tests.s3 import CREDENTIALS, free_port

pytestmark = pytest.mark.slow
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "DS_ACCELERATOR": "cpu",
    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
}


def run(command: list[str], procs: int, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_ranks(command, procs, env or ENV)


def harness(tmp_path: Path, procs: int, *args: str) -> dict:
    out = tmp_path / f"result-{procs}-{abs(hash(args))}.json"
    run([str(REPO / "tests" / "distributed_harness.py"), args[0], str(out), *args[1:]], procs)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return harness(tmp_path_factory.mktemp("reference"), 1, "train")


def assert_close(got: list[float], want: list[float], relative: float, count: int = 5) -> None:
    assert len(got) == len(want) == count
    for a, b in zip(got, want):
        assert abs(a - b) <= relative * abs(b), (got, want)


@pytest.mark.parametrize(
    "procs, layout",
    [
        (2, ["parallel.dp_shard=2"]),
        (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
        (4, ["parallel.dp_shard=2", "parallel.sp=2"]),
        (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
        (4, ["parallel.tp=2", "parallel.sp=2", "parallel.dp_shard=1"]),
    ],
    ids=["fsdp2", "hsdp-2x2", "fsdp2-x-sp2", "tp2-x-fsdp2", "tp2-x-sp2"],
)
def test_fsdp_layouts_train_like_one_process(tmp_path, one_process, procs, layout):
    result = harness(tmp_path, procs, "train", *layout)
    assert_close(result["losses"], one_process["losses"], 1e-5)
    assert_close(result["grad_norms"], one_process["grad_norms"], 1e-5)


def relative_difference(got: dict, want: dict) -> float:
    """|got - want| / |want| over all tensors together (zero-initialised ones make per-tensor ratios moot)."""
    num = sum(float((got[k].double() - want[k].double()).norm()) ** 2 for k in want)
    return (num / sum(float(t.double().norm()) ** 2 for t in want.values())) ** 0.5


def test_a_planned_split_over_four_ranks_steps_like_one_process(tmp_path):
    """32 samples over 4 FSDP2 units with 1-top-image micro-batches (3 per step), a clip of 0.01 that acts
    every step: the same weights and EMA as one process training the whole batch."""
    overrides = ["train.global_batch=32", "train.micro_tokens=64", "train.grad_clip=0.01", "model.class_dropout=0.1"]
    whole = harness(tmp_path, 1, "train", *overrides)
    split = harness(tmp_path, 4, "train", *overrides, "parallel.dp_shard=4")
    assert min(whole["micro_batches"]) >= 8 and min(split["micro_batches"]) >= 2  # accumulation on both
    assert min(whole["grad_norms"]) > 0.01  # the clip acts
    assert_close(split["losses"], whole["losses"], 1e-6)
    assert_close(split["grad_norms"], whole["grad_norms"], 1e-6)
    states = [torch.load(path, weights_only=True) for path in sorted(tmp_path.glob("result-*.pt"))]
    assert len(states) == 2
    for part in ("model", "ema"):
        assert relative_difference(states[0][part], states[1][part]) <= 1e-6, part


def test_tensor_parallel_steps_like_one_process(tmp_path):
    """tp = 2 (megatron-core layers, TP-aware q/k norm, chunk-preserving modulation): the same losses, grad
    norms, weights and EMA as one process over 5 steps."""
    whole = harness(tmp_path, 1, "train")
    split = harness(tmp_path, 2, "train", "parallel.tp=2", "parallel.dp_shard=1")
    assert_close(split["losses"], whole["losses"], 1e-5)
    assert_close(split["grad_norms"], whole["grad_norms"], 1e-5)
    states = [torch.load(path, weights_only=True) for path in sorted(tmp_path.glob("result-*.pt"))]
    assert len(states) == 2 and set(states[0]["model"]) == set(states[1]["model"])  # names kept
    for part in ("model", "ema"):
        assert relative_difference(states[0][part], states[1][part]) <= 1e-5, part


def test_a_tensor_parallel_checkpoint_resumes_at_tp1_and_at_tp2_x_fsdp2(tmp_path, shapes_dataset):
    saved = tmp_path / "tp2"
    run(train_command(saved, shapes_dataset, 4, "parallel.tp=2", "parallel.dp_shard=1"), 2)
    for name, procs, layout in (("tp1", 1, []), ("tp2-x-fsdp2", 4, ["parallel.tp=2", "parallel.dp_shard=2"])):
        resumed = tmp_path / name
        shutil.copytree(saved, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000004")  # resume from step 2
        run(train_command(resumed, shapes_dataset, 4, *layout), procs)
        assert_close(losses(resumed), losses(saved), 1e-5, count=4)
    model, cfg = load_for_sampling(saved)  # saved whole: a plain model samples from it
    assert generate(model, cfg, [1], 1, seed=0, steps_per_stage=2, cfg_scale=2.0).shape == (1, 3, 32, 32)


def test_deepspeed_zero3_trains_like_one_process(tmp_path, one_process):
    result = harness(tmp_path, 2, "train", "engine=deepspeed")
    assert_close(result["losses"], one_process["losses"], 1e-4)


@pytest.mark.parametrize("sp", [2, 4])
def test_ulysses_attention_equals_one_process_on_mixed_lengths(tmp_path, sp):
    result = harness(tmp_path, sp, "attention", str(sp))
    assert result["tokens"] == 6001  # sequences of 1 to 4096 tokens (two 6 x 20), not a multiple of sp: padded
    assert max(result["max_abs_diff"]) <= 1e-5  # output, dq, dk, dv


def train_command(run_dir: Path, data: Path, steps: int, *extra: str) -> list[str]:
    overrides = tiny_overrides(run_dir, data, f"train.steps={steps}", "checkpoint.every=2", *extra)
    return ["-m", "pixelflow", "train", "configs/demo.yaml", *overrides]


def files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_cli_writes_the_layout_one_process_writes_and_resumes_exactly(tmp_path, shapes_dataset):
    single, double, resumed = tmp_path / "single", tmp_path / "double", tmp_path / "resumed"
    run(train_command(single, shapes_dataset, 4), 1)
    run(train_command(double, shapes_dataset, 4, "parallel.dp_shard=2"), 2)
    expected = [
        f"checkpoints/step_0000000{step}/{name}"
        for step in (2, 4)
        for name in (".metadata", "__0_0.distcp", "config.yaml", "manifest.json", "state.json")
    ] + [".lock", "config.yaml", "metrics.jsonl"]
    assert files(single) == sorted(expected)
    assert files(double) == sorted(
        expected + ["checkpoints/step_00000002/__1_0.distcp", "checkpoints/step_00000004/__1_0.distcp"]
    )
    for folder in (double / "checkpoints").iterdir():  # the manifest covers every file but itself, nothing else
        listed = json.loads((folder / "manifest.json").read_text())["files"]
        assert sorted(listed) == sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    run(train_command(resumed, shapes_dataset, 2, "parallel.dp_shard=2"), 2)
    run(train_command(resumed, shapes_dataset, 4, "parallel.dp_shard=2"), 2)
    assert losses(resumed) == losses(double)
    model, cfg = load_for_sampling(double)  # a sharded run's checkpoint is a plain model's
    images = generate(model, cfg, [1, 2], 2, seed=0, steps_per_stage=2, cfg_scale=2.0)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8


@pytest.fixture(scope="module")
def s3_plan_shapes(s3_endpoint) -> str:
    """96 samples in 6 shards on the moto S3 server."""
    from data_tools.synthetic import write_synthetic_dataset

    path = "s3://pixelflow-test/plan-shapes"
    write_synthetic_dataset(path, 96, 16, size=40, seed=4, storage_options={"endpoint_url": s3_endpoint.endpoint})
    return path


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_one_two_and_four_ranks_train_the_same_trajectory_from_the_shards(tmp_path, request, where):
    """Through the CLI and the real data path (lanes, workers, the planner, the all-to-all): one process,
    dp_shard=2 and dp_shard=2 x sp=2, each with another worker count, log the same losses and draw the same
    periodic sample grid (its images split over the ranks)."""
    if where == "disk":
        data, extra, env = request.getfixturevalue("shapes_dataset"), [], ENV
    else:
        data, endpoint = request.getfixturevalue("s3_plan_shapes"), request.getfixturevalue("s3_endpoint")
        extra, env = ["--endpoint-url", endpoint.endpoint], {**ENV, **CREDENTIALS}
    trajectories, grids = [], []
    periodic = ["sample.every=6", "sample.count=3", "sample.steps_per_stage=2"]
    for procs, layout in [
        (1, ["data.num_workers=0"]),
        (2, ["parallel.dp_shard=2", "data.num_workers=2"]),
        (4, ["parallel.dp_shard=2", "parallel.sp=2", "data.num_workers=1"]),
    ]:
        run_dir = tmp_path / f"ranks-{procs}"
        run(
            train_command(run_dir, data, 6, "checkpoint.every=6", "model.class_dropout=0.2", *periodic, *layout)
            + extra,
            procs,
            env,
        )
        trajectories.append(losses(run_dir))
        grids.append(np.asarray(Image.open(run_dir / "samples" / "step_00000006.png")).astype(int))
        for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
            assert record["plan_max_over_mean"] >= 1.0 and record["busy_max_over_mean"] >= 1.0
            assert 0.0 <= record["padding_fraction"] < 1.0 and record["graphs"] >= 1
    assert len(trajectories[0]) == 6
    for trajectory in trajectories[1:]:
        assert_close(trajectory, trajectories[0], 1e-5, count=6)
    for grid in grids[1:]:  # EMA weights equal to ~1e-7: a pixel may round to the neighbouring level
        assert np.abs(grid - grids[0]).max() <= 2 and np.abs(grid - grids[0]).mean() < 0.05


def test_deepspeed_checkpoints_resume_exactly_and_sample(tmp_path, shapes_dataset):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(train_command(whole, shapes_dataset, 4, "engine=deepspeed"), 2)
    run(train_command(split, shapes_dataset, 2, "engine=deepspeed"), 2)
    run(train_command(split, shapes_dataset, 4, "engine=deepspeed"), 2)
    assert losses(split) == pytest.approx(losses(whole), rel=1e-6)
    assert (split / "checkpoints" / "step_00000004" / "deepspeed" / "zero").is_dir()
    for procs, engine, message in [
        (1, "engine=deepspeed", "DeepSpeed ZeRO-3 state of 2 ranks cannot reshard onto 1; resume on 2 ranks"),
        (2, "engine=fsdp", "written by another engine: it has no 'optimizer' state"),
    ]:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        command += ["--master_port", str(free_port())] + train_command(split, shapes_dataset, 6, engine)
        refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
        assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    model, cfg = load_for_sampling(split)
    assert generate(model, cfg, [0], 1, seed=0, steps_per_stage=2, cfg_scale=1.5).shape == (1, 3, 32, 32)


def test_deepspeed_on_one_process_trains_like_fsdp_and_resumes_exactly(tmp_path, shapes_dataset):
    """One process is a documented layout for every engine: DeepSpeed gets a process group of one rank."""
    plain, whole, split = tmp_path / "plain", tmp_path / "whole", tmp_path / "split"
    run(train_command(plain, shapes_dataset, 4), 1)
    run(train_command(whole, shapes_dataset, 4, "engine=deepspeed"), 1)
    run(train_command(split, shapes_dataset, 2, "engine=deepspeed"), 1)
    run(train_command(split, shapes_dataset, 4, "engine=deepspeed"), 1)
    assert_close(losses(whole), losses(plain), 1e-5, count=4)
    assert losses(split) == losses(whole)
