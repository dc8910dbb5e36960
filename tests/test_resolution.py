"""Progressive resolution (data.resolution_schedule): crops, plans and budgets follow the schedule, and a run
resumes exactly on both sides of a switch."""

from __future__ import annotations

import json

import pytest
import torch

from pixelflow.config import DataConfig, ResolutionPhase
from pixelflow.data.loader import DataStream
from pixelflow.errors import ConfigError
from pixelflow.train.trainer import train
from pixelflow.weights import read_weights
from tests.conftest import cli, tiny_config
from tests.test_fault_tolerance import losses, run_to_end, train_args

SCHEDULE = ("data.resolution=64", "data.resolution_schedule=[{until_step: 3, resolution: 32}]")


def test_the_crops_follow_the_schedule_and_are_the_same_crops_as_a_fixed_resolution(shapes_dataset):
    phases = [ResolutionPhase(until_step=2, resolution=32)]
    data = DataConfig(path=str(shapes_dataset), resolution=64, resolution_schedule=phases, num_workers=0, lanes=3)
    shares = [next(stream) for stream in [DataStream(data, global_batch=8, seed=1)] for _ in range(4)]
    assert [tuple(share.images.shape[-2:]) for share in shares] == [(32, 32)] * 2 + [(64, 64)] * 2
    fixed = DataStream(
        DataConfig(path=str(shapes_dataset), resolution=32, num_workers=0, lanes=3), global_batch=8, seed=1
    )
    assert torch.equal(next(fixed).images, shares[0].images)  # the same samples, the same keyed crop


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_a_32_to_64_pixel_run_resumes_exactly_on_both_sides_of_the_switch(tmp_path, shapes_dataset):
    whole = train(tiny_config(tmp_path / "whole", shapes_dataset, *SCHEDULE, "checkpoint.every=2")).run_dir
    records = metrics(whole)
    assert [r["resolution"] for r in records] == [32, 32, 32, 64, 64, 64]
    low, high = (
        records[2]["tokens_per_s"] / records[2]["img_per_s"],
        records[3]["tokens_per_s"] / records[3]["img_per_s"],
    )
    assert high == pytest.approx(4 * low)  # a 64 px batch has 4x the tokens of a 32 px one at every stage
    split = tmp_path / "split"
    for steps in (2, 4, 6):  # stops before the switch (step 2), after it (step 4), then the end
        train(tiny_config(split, shapes_dataset, *SCHEDULE, "checkpoint.every=2", f"train.steps={steps}"))
    assert [r["loss"] for r in metrics(split)] == [r["loss"] for r in records]
    for which in ("model", "ema"):
        final_whole, _ = read_weights(whole, which)
        final_split, _ = read_weights(split, which)
        assert all(torch.equal(tensor, final_split[name]) for name, tensor in final_whole.items())


@pytest.mark.parametrize(
    "schedule, message",
    [
        ("[{until_step: 3, resolution: 48}]", "'data.resolution_schedule' has resolution 48, not a multiple of"),
        ("[{until_step: 3, resolution: 32}, {until_step: 3, resolution: 32}]", "until_step' = 3 must be above"),
        ("[{resolution: 32}]", "'data.resolution_schedule[0].until_step' is required but not set"),
    ],
)
def test_a_wrong_schedule_is_one_line(tmp_path, schedule, message):
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path / "run", tmp_path / "data", "data.resolution=64", f"data.resolution_schedule={schedule}")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_two_ranks_train_across_the_switch_like_one_process(tmp_path, shapes_dataset):
    one, two = tmp_path / "one", tmp_path / "two"
    run_to_end(train_args(one, shapes_dataset, 6, *SCHEDULE, "parallel.dp_shard=1"), 1)
    run_to_end(train_args(two, shapes_dataset, 6, *SCHEDULE))
    want, got = losses(one), losses(two)
    assert len(want) == 6 and all(abs(a - b) <= 1e-5 * b for a, b in zip(got, want))


def test_an_export_fine_tunes_at_another_resolution(tmp_path, shapes_dataset):
    run_dir = train(tiny_config(tmp_path / "low", shapes_dataset, "train.steps=2")).run_dir
    export = tmp_path / "export"
    assert cli("pixelflow", "export", str(run_dir), str(export)).returncode == 0
    tuned = train(
        tiny_config(tmp_path / "high", shapes_dataset, f"resume={export}", "data.resolution=64", "train.steps=2")
    )
    fresh = train(tiny_config(tmp_path / "fresh", shapes_dataset, "data.resolution=64", "train.steps=2"))
    records = metrics(tuned.run_dir)
    assert [r["resolution"] for r in records] == [64, 64]
    assert records[0]["loss"] != metrics(fresh.run_dir)[0]["loss"]  # the same batch, from the exported weights
