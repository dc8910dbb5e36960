"""Checkpoints on one process: commit, pruning, corruption, refusal to touch a run it cannot resume, export,
older single-file checkpoints. (Several processes, signals and SIGKILL: tests/test_fault_tolerance.py.)"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from PIL import Image
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from pixelflow.config import to_yaml
from pixelflow.errors import CheckpointError
from pixelflow.generate import generate, load_for_sampling
from pixelflow.parallel.world import World
from pixelflow.train.checkpoint import Checkpointer
from pixelflow.train.engine import FsdpEngine
from pixelflow.train.trainer import TrainProgress, train
from pixelflow.weights import committed_checkpoints, read_weights, resolve_source
from tests.conftest import cli, error_lines, tiny_config, tiny_overrides


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def nine_steps(tmp_path_factory, shapes_dataset):
    """An uninterrupted 9-step run, checkpoints every 3 steps."""
    return train(tiny_config(tmp_path_factory.mktemp("whole") / "run", shapes_dataset, "train.steps=9")).run_dir


def test_checkpoints_present_but_none_usable_is_one_error_line_and_nothing_is_touched(tmp_path, shapes_dataset):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset)).run_dir
    for folder in committed_checkpoints(run_dir / "checkpoints"):
        shard = folder / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])
    before = snapshot(run_dir)
    done = cli("pixelflow", "train", "configs/demo.yaml", *tiny_overrides(run_dir, shapes_dataset, "train.steps=9"))
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("pixelflow: error: ") and "none usable" in line
    assert "step_00000003/__0_0.distcp" in line and "step_00000006/__0_0.distcp" in line
    assert [entry for entry in done.stderr.splitlines() if "error:" in entry] == [line]
    assert snapshot(run_dir) == before  # metrics, config and checkpoints byte for byte


def test_damaged_newest_is_skipped_with_a_warning_and_cannot_be_sampled(tmp_path, shapes_dataset, nine_steps, caplog):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset)).run_dir
    shard = run_dir / "checkpoints" / "step_00000006" / "__0_0.distcp"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(damaged))

    sampled = cli("pixelflow", "sample", "--checkpoint", str(shard.parent), "--out", str(tmp_path / "x.png"))
    assert sampled.returncode == 2
    assert sampled.stderr.strip().splitlines() == [
        f"pixelflow: error: {shard}: checksum differs from the manifest (damaged)"
    ]

    caplog.set_level(logging.INFO, logger="pixelflow")
    train(tiny_config(run_dir, shapes_dataset, "train.steps=9"))
    assert f"{shard}: checksum differs from the manifest (damaged); using the previous committed" in caplog.text
    assert "resumed from" in caplog.text and "step_00000003 at step 3" in caplog.text
    assert losses(run_dir) == losses(nine_steps)  # steps 4..9 trained again, exactly


def test_pruning_keeps_the_newest_and_every_kth_and_leaves_stray_entries_alone(tmp_path, shapes_dataset):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step_00000099").write_text("a file named like a checkpoint")
    (checkpoints / "step_00000098").mkdir()  # a folder named like one, never committed
    (checkpoints / "step_00000098" / "junk").write_text("x")
    (checkpoints / "step_00000006").mkdir()  # an uncommitted leftover at a step this run saves
    (checkpoints / "step_00000006" / "__0_0.distcp").write_text("half written")
    (checkpoints / ".step_00000002.tmp").mkdir()  # a stale temporary of a crashed save
    (checkpoints / ".step_00000002.tmp" / "__0_0.distcp").write_text("x")
    (checkpoints / "notes.txt").write_text("mine")
    overrides = ["train.steps=10", "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.keep_every=4"]
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, *overrides)).run_dir
    assert [p.name for p in committed_checkpoints(checkpoints)] == ["step_00000004", "step_00000008", "step_00000010"]
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "notes.txt",
        "step_00000004",
        "step_00000008",
        "step_00000010",
        "step_00000098",
        "step_00000099",
    ]
    assert (checkpoints / "step_00000099").read_text() == "a file named like a checkpoint"
    assert (checkpoints / "step_00000098" / "junk").read_text() == "x"
    result = train(tiny_config(run_dir, shapes_dataset, *overrides[1:], "train.steps=12"))
    assert result.step == 12 and [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").open()] == list(
        range(1, 13)
    )


@pytest.mark.slow
def test_export_samples_the_same_images_as_the_run_directory(tmp_path, shapes_dataset):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3")).run_dir
    for which in ("ema", "model"):
        out = tmp_path / f"export-{which}"
        done = cli("pixelflow", "export", str(run_dir), str(out), "--weights", which)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
        images = []
        for source in (run_dir, out):
            model, cfg = load_for_sampling(source, which)
            images.append(generate(model, cfg, [0, 5], 2, seed=3, steps_per_stage=2, cfg_scale=2.0))
        assert torch.equal(images[0], images[1])
    ema, _ = read_weights(run_dir, "ema")
    model, _ = read_weights(run_dir, "model")
    assert any(not torch.equal(ema[name], model[name]) for name in ema)  # the two exports differ


def test_a_different_model_shape_is_one_line_naming_the_tensor(tmp_path, shapes_dataset):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3")).run_dir
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError) as error:
        train(tiny_config(run_dir, shapes_dataset, "model.head_dim=8"))
    message = str(error.value)
    assert "\n" not in message
    assert message.endswith(
        "tensor 'model/patch_embed.weight' is [32, 48] in the checkpoint but [16, 48] in this model"
    )
    assert snapshot(run_dir) == before


def test_resume_none_refuses_a_run_directory_that_has_checkpoints(tmp_path, shapes_dataset):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3")).run_dir
    with pytest.raises(CheckpointError, match="resume=none but the run directory already holds checkpoints"):
        train(tiny_config(run_dir, shapes_dataset, "resume=none"))


def test_fine_tuning_from_an_export_starts_at_step_zero_with_its_weights(tmp_path, shapes_dataset):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3")).run_dir
    cli("pixelflow", "export", str(run_dir), str(tmp_path / "export"))
    tuned = train(tiny_config(tmp_path / "tuned", shapes_dataset, "train.steps=1", f"resume={tmp_path / 'export'}"))
    assert tuned.step == 1
    first = json.loads((tuned.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    fresh = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] != fresh["loss"]  # trained weights, not the seeded init


def write_legacy_checkpoint(run_dir, shapes_dataset, step: int) -> None:
    """Rewrite step folder `step` as the single-file checkpoint earlier versions wrote, then remove it."""
    cfg = tiny_config(run_dir, shapes_dataset)
    world = World(0, 1, torch.device("cpu"))
    engine = FsdpEngine(cfg, world)
    progress = TrainProgress(world)
    parts = {**engine.checkpoint_parts(), "train": progress}
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, world, cfg)
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    checkpointer.load(resolve_source(folder), parts)
    options = StateDictOptions(full_state_dict=True)
    legacy = {
        "model": engine.model.state_dict(),
        "ema": engine.ema.state_dict(),
        "optimizer": get_optimizer_state_dict(engine.model, engine.optimizer, options=options),
        "lr_scheduler": engine.lr_schedule.state_dict(),
        "data": progress.data_state,
        "config": to_yaml(cfg),
        "step": step,
    }
    torch.save(legacy, run_dir / "checkpoints" / f"step_{step:08d}.pt")
    shutil.rmtree(folder)


@pytest.mark.slow
def test_older_single_file_checkpoints_sample_and_fine_tune_but_do_not_resume(tmp_path, shapes_dataset):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3")).run_dir
    write_legacy_checkpoint(run_dir, shapes_dataset, 3)
    legacy = run_dir / "checkpoints" / "step_00000003.pt"
    assert load_for_sampling(legacy)[1].model.depth == 2  # sampling reads it as it is

    refused = cli("pixelflow", "train", "configs/demo.yaml", *tiny_overrides(run_dir, shapes_dataset, "train.steps=9"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"pixelflow: error: {legacy}: single-file checkpoint from an earlier version, which no longer resumes; "
        f"train on from its weights with resume={legacy} and another run_dir"
    )
    tuned = train(tiny_config(tmp_path / "tuned", shapes_dataset, "train.steps=2", f"resume={legacy}"))
    assert tuned.step == 2 and len(losses(tuned.run_dir)) == 2  # a new lineage from the file's weights


def test_async_saves_name_their_staging_options_and_fall_back_to_sync_without_them(
    tmp_path, shapes_dataset, monkeypatch, caplog
):
    """DCP's staging API is young (torch 2.11 on the GPU image, 2.13 here): options are passed by name, and
    a torch whose StagingOptions lacks one saves synchronously with a warning instead of failing the run."""
    import dataclasses

    import torch.distributed.checkpoint.staging as staging

    from pixelflow.train.checkpoint import background_stager

    stager = background_stager(torch.device("cpu"))
    assert stager is not None
    assert dataclasses.asdict(stager._config) == {
        "use_pinned_memory": False,
        "use_shared_memory": False,
        "use_async_staging": False,
        "use_non_blocking_copy": False,
    }
    stager.close()

    @dataclasses.dataclass
    class OlderOptions:  # a release whose options are spelled otherwise
        use_pinned_memory: bool = True
        use_async_staging: bool = True

    monkeypatch.setattr(staging, "StagingOptions", OlderOptions)
    cfg = tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3", "checkpoint.async_save=true")
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    assert [p.name for p in committed_checkpoints(result.run_dir / "checkpoints")] == ["step_00000003"]
    assert "no usable DefaultStager" in caplog.text and "saving synchronously" in caplog.text


def test_a_square_model_samples_a_non_square_grid_of_the_requested_size(tmp_path, nine_steps):
    out = tmp_path / "wide.png"
    done = cli("pixelflow", "sample", "--checkpoint", str(nine_steps), "--out", str(out), "--size", "32x64",
               "--classes", "0", "1", "--steps", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(out) as grid:  # two 32 x 64 images side by side, 2-pixel gutters
        assert grid.size == (2 * 64 + 3 * 2, 32 + 2 * 2)
    done = cli("pixelflow", "sample", "--checkpoint", str(nine_steps), "--out", str(out), "--size", "30x64")
    assert error_lines(done.stderr) == [
        "pixelflow: error: --size 30x64: must be HEIGHTxWIDTH (or one side) in pixels, each a positive multiple of "
        "32 (patch_size x 2^(stages-1) of this model)"
    ]
