"""The single-process trainer: run directory contents, learning, exact resume, sampling from checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pixelflow.train.trainer import train
from pixelflow.weights import committed_checkpoints, read_weights
from tests.conftest import cli, tiny_config


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_config_metrics_and_checkpoints(tmp_path, shapes_dataset):
    result = train(tiny_config(tmp_path / "run", shapes_dataset, "train.peak_tflops=10"))
    run_dir = result.run_dir
    assert (result.step, result.stopped, result.exit_status) == (6, False, 0)
    assert (run_dir / "config.yaml").read_text().startswith("run_dir:")
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "loss_stage0", "loss_stage3", "grad_norm", "img_per_s", "lr"):
        assert all(key in r for r in records), key
    for r in records:  # one process: one unit, nothing to balance, one layout per step at most
        assert r["plan_max_over_mean"] == 1.0 and r["busy_max_over_mean"] == 1.0 and r["padding_fraction"] == 0.0
        assert 1 <= r["graphs"] <= r["step"]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1  # against a 10 TFLOP/s peak
        assert 0 <= r["data_wait_fraction"] <= 1 and 0 < r["peak_memory_gib"] < 64
    assert records[0]["checkpoint_blocking_s"] == 0 and records[3]["checkpoint_blocking_s"] > 0  # saved at 3
    assert [p.name for p in committed_checkpoints(run_dir / "checkpoints")] == ["step_00000003", "step_00000006"]
    folder = run_dir / "checkpoints" / "step_00000006"
    assert {".metadata", "__0_0.distcp", "state.json", "config.yaml", "manifest.json"} == {
        p.name for p in folder.iterdir()
    }
    state = json.loads((folder / "state.json").read_text())
    assert set(state) == {"model", "ema", "optimizer", "lr_schedule", "train"}
    [data] = state["train"]["data"]["sources"]  # 6 lanes (one per shard); 6 steps x 8 samples of them, none bad
    assert state["train"]["step"] == 6 and data["num_lanes"] == 6 and sum(data["positions"]) == data["taken"] == 48
    assert records[1]["lr"] == pytest.approx(records[2]["lr"]) and records[0]["lr"] < records[1]["lr"]  # warmup 2


def test_resume_continues_with_the_same_losses_as_an_uninterrupted_run(tmp_path, shapes_dataset):
    whole = train(tiny_config(tmp_path / "whole", shapes_dataset, "data.num_workers=2")).run_dir
    split = tmp_path / "split"
    train(tiny_config(split, shapes_dataset, "data.num_workers=2", "train.steps=3"))
    assert [r["step"] for r in metrics(split)] == [1, 2, 3]
    train(tiny_config(split, shapes_dataset, "data.num_workers=2"))
    timing = (
        "img_per_s",
        "tokens_per_s",
        "busy_max_over_mean",
        "data_wait_fraction",
        "peak_memory_gib",
        "checkpoint_blocking_s",
        "graphs",
    )  # measured, or counted since the process started

    def trained(records):
        return [{k: v for k, v in r.items() if k not in timing} for r in records]

    assert trained(metrics(split)) == trained(metrics(whole))
    for which in ("model", "ema"):
        final_whole, _ = read_weights(whole, which)
        final_split, _ = read_weights(split, which)
        for name, tensor in final_whole.items():
            assert torch.equal(tensor, final_split[name]), (which, name)


def test_a_crash_after_the_last_checkpoint_drops_stale_metrics_on_resume(tmp_path, shapes_dataset):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, shapes_dataset, "train.steps=5"))  # checkpoint at 3 and 5
    shutil.rmtree(run_dir / "checkpoints" / "step_00000005")  # as if the process died after logging step 5
    train(tiny_config(run_dir, shapes_dataset))
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_a_short_run_learns(tmp_path, shapes_dataset):
    cfg = tiny_config(
        tmp_path / "run",
        shapes_dataset,
        "train.steps=150",
        "train.log_every=50",
        "train.lr=2e-3",
        "train.global_batch=16",
        "checkpoint.every=150",
        "model.num_heads=4",
    )
    records = metrics(train(cfg).run_dir)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]


def test_sample_command_writes_a_grid_from_a_checkpoint(tmp_path, shapes_dataset):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3")).run_dir
    out = tmp_path / "grid.png"
    command = [
        "pixelflow",
        "sample",
        "--checkpoint",
        str(run_dir),
        "--out",
        str(out),
        "--classes",
        "0",
        "3",
        "15",
        "--per-class",
        "2",
        "--steps",
        "2",
        "--cfg",
        "2.0",
    ]
    result = cli(*command)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns x 2 rows of 32 px, 2 px gutters

    bad = cli(*command[:-8] + ["--classes", "99"])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["pixelflow: error: --classes: [99] outside 0..15 for this checkpoint"]
    missing = cli(*command[:3], tmp_path / "nothing", "--out", out)
    assert missing.returncode == 2 and "no checkpoint found" in missing.stderr


@pytest.mark.parametrize("mode", ["offline", "online"])  # online without an API key falls back to offline
def test_wandb_run_is_written_into_the_run_directory(tmp_path, shapes_dataset, monkeypatch, mode):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials either
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = ["train.steps=2", f"wandb.mode={mode}", "sample.every=2", "sample.count=3", "sample.steps_per_stage=2"]
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, *overrides)).run_dir
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id in offline_runs[0].name
    assert Image.open(run_dir / "samples" / "step_00000002.png").size == (2 + 2 * 34, 2 + 2 * 34)  # 3 in a 2x2 grid
    logged = (offline_runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"loss_stage0" in logged and b"samples" in logged  # the keys and the sample image were logged
    assert list((offline_runs[0] / "files" / "media" / "images").glob("samples_2_*.png"))
    train(tiny_config(tmp_path / "run", shapes_dataset, *overrides[1:], "train.steps=4"))  # resumed
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    assert all(run_id in p.name for p in (run_dir / "wandb").glob("offline-run-*"))  # the same run continues


def test_report_plots_one_or_several_runs(tmp_path, shapes_dataset):
    first = train(tiny_config(tmp_path / "first", shapes_dataset, "train.steps=3", "train.peak_tflops=10")).run_dir
    second = train(tiny_config(tmp_path / "second", shapes_dataset, "train.steps=3", "train.lr=1e-4")).run_dir
    done = cli("pixelflow", "report", first, second, "--out", tmp_path / "plots")
    assert done.returncode == 0, done.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == sorted(
        ["loss.png", "loss_per_stage.png", "throughput.png", "mfu.png", "data_wait.png", "balance.png", "grad_norm.png"]
    )
    assert all(Image.open(tmp_path / "plots" / name).size == (700, 400) for name in written)
    missing = cli("pixelflow", "report", tmp_path)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr


def test_cosine_schedule_warms_up_then_decays_to_min_lr_at_the_last_step():
    from pixelflow.config import TrainConfig
    from pixelflow.train.optim import build_optimizer

    cfg = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr=1e-4)
    optimizer, schedule = build_optimizer(torch.nn.Linear(2, 2), cfg)
    rates = []
    for _ in range(cfg.steps):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate of the step about to be taken
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)  # linear warmup
    assert rates[59] == pytest.approx(0.55e-3)  # half way through the decay: the mean of lr and min_lr
    assert rates[-1] == pytest.approx(1e-4)  # the last step runs at min_lr
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    cfg.lr_schedule = "constant"
    assert build_optimizer(torch.nn.Linear(2, 2), cfg)[0].param_groups[0]["lr"] == pytest.approx(1e-4)


def test_the_step_refuses_inputs_on_another_device(tmp_path, shapes_dataset):
    """The checkpoint benchmark once handed CPU images to a CUDA step; the step names the mismatch at once."""
    from pixelflow.data.planner import plan_settings, plan_step
    from pixelflow.parallel.world import World
    from pixelflow.train.batches import UnitBatch
    from pixelflow.train.engines import build_engine
    from pixelflow.train.step import StepRunner

    cfg = tiny_config(tmp_path, shapes_dataset)
    world = World(0, 1, torch.device("cpu"))
    plan = plan_step(plan_settings(cfg, 1), 1)
    images = torch.zeros((8, 3, 32, 32), dtype=torch.uint8, device="meta")
    labels = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="images on meta and labels on cpu, but the step runs on cpu"):
        StepRunner(cfg, world, build_engine(cfg, world)).run(UnitBatch(1, plan, images, labels))


def test_the_periodic_grid_samples_its_images_in_one_batch_as_each_alone(tmp_path, shapes_dataset):
    """One batched call draws every image with its own seed's noise: the grid equals one call per image."""
    from pixelflow.generate import generate
    from pixelflow.model import PixelFlowTransformer
    from pixelflow.parallel.world import World
    from pixelflow.train.samples import PeriodicSamples

    cfg = tiny_config(tmp_path, shapes_dataset, "sample.every=1", "sample.count=3", "sample.steps_per_stage=2")
    torch.manual_seed(3)
    model = PixelFlowTransformer(cfg.model).eval()
    grid = PeriodicSamples(cfg, World(0, 1, torch.device("cpu")), tmp_path).write(1, model.state_dict())
    alone = [generate(model, cfg, [i], 1, cfg.seed + i, 2, cfg.sample.guidance_scale)[0] for i in range(3)]
    pixels = np.asarray(Image.open(grid)).astype(int)
    for i, image in enumerate(alone):
        top, left = 2 + (i // 2) * 34, 2 + (i % 2) * 34
        tile = pixels[top : top + 32, left : left + 32].transpose(2, 0, 1)
        assert np.abs(tile - image.numpy().astype(int)).max() <= 1  # batched matmuls may round a level apart
