"""`pixelflow eval`: exactly N images, each index drawn once across ranks, the same images on any number of
ranks, resumable, in the ADM npz layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_tools.classifier import train_classifier
from pixelflow.train.trainer import train
from tests.conftest import run_ranks, tiny_config

pytestmark = pytest.mark.slow


def written(out) -> list[dict]:
    return [json.loads(line) for path in sorted(out.glob("written_rank_*.jsonl")) for line in path.open()]


def test_eval_draws_exactly_n_images_once_each_on_any_number_of_ranks_and_resumes(
    tmp_path, shapes_dataset, inception_file
):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=2")).run_dir
    options = [
        "--checkpoint",
        str(run_dir),
        "--images",
        "5",
        "--batch",
        "2",
        "--steps",
        "2",
        "--classes",
        "1",
        "2",
        "3",
    ]

    def evaluate(out, procs):
        run_ranks(["-m", "pixelflow", "eval", "--out", str(out), *options], procs)
        return np.load(out / "samples_5.npz")

    one, two = evaluate(tmp_path / "one", 1), evaluate(tmp_path / "two", 2)
    assert one["arr_0"].shape == (5, 32, 32, 3) and one["arr_0"].dtype == np.uint8
    assert one["labels"].tolist() == [1, 2, 3, 1, 2]
    assert np.array_equal(two["arr_0"], one["arr_0"])  # the same images, whoever drew them
    drawn = written(tmp_path / "two")
    assert sorted(r["index"] for r in drawn) == [0, 1, 2, 3, 4]  # each index exactly once
    assert {r["rank"] for r in drawn} == {0, 1}
    assert sorted(p.name for p in (tmp_path / "two" / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]

    evaluate(tmp_path / "two", 2)  # a rerun keeps every finished image
    assert written(tmp_path / "two") == drawn
    (tmp_path / "two" / "images" / "000003.png").unlink()  # lost: only its batch (2, 3) is drawn again
    again = evaluate(tmp_path / "two", 2)
    assert sorted(r["index"] for r in written(tmp_path / "two")[len(drawn) :]) == [2, 3]
    assert np.array_equal(again["arr_0"], one["arr_0"])

    # scoring a finished eval folder: the samples are kept, the scores written beside them
    train_classifier(str(tmp_path / "classifier.pt"), steps=5, count=32)
    np.savez(tmp_path / "reference.npz", arr_0=one["arr_0"][::-1].copy())
    scoring = ["--classifier", str(tmp_path / "classifier.pt"), "--inception-weights", str(inception_file)]
    run_ranks(
        [
            "-m",
            "pixelflow",
            "eval",
            "--out",
            str(tmp_path / "one"),
            *options,
            *scoring,
            "--reference",
            str(tmp_path / "reference.npz"),
        ],
        1,
    )
    scores = json.loads((tmp_path / "one" / "scores.json").read_text())
    assert set(scores) == {"class_accuracy", "fid", "sfid", "inception_score", "precision", "recall"}
    assert 0 <= scores["class_accuracy"] <= 1
    assert abs(scores["fid"]) < 1e-3  # the reference holds the same images (in another order)
    assert len(written(tmp_path / "one")) == 5  # nothing drawn again


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, shapes_dataset):
    """Two tiny runs of 2 steps with other seeds: two checkpoints of one model."""
    root = tmp_path_factory.mktemp("checkpoints")
    return [
        train(tiny_config(root / f"run{seed}", shapes_dataset, "train.steps=2", f"seed={seed}")).run_dir
        for seed in (0, 3)
    ]


def eval_cli(capsys, *options) -> tuple[int, list[str]]:
    from pixelflow.cli import main

    capsys.readouterr()
    status = main(["eval", "--steps", "1", "--batch", "2", "--device", "cpu", *map(str, options)])
    return status, [line for line in capsys.readouterr().err.splitlines() if line.startswith("pixelflow")]


def pngs(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_an_eval_folder_refuses_images_drawn_otherwise_and_redraws_them_when_asked(tmp_path, two_checkpoints, capsys):
    first, second = two_checkpoints
    out = tmp_path / "eval"
    base = ["--out", out, "--images", 3, "--classes", 1, 2]
    assert eval_cli(capsys, "--checkpoint", first, *base) == (0, [])
    drawn = pngs(out)
    changes = {
        "checkpoint": ["--checkpoint", second],
        "seed": ["--checkpoint", first, "--seed", 1],
        "guidance_scale": ["--checkpoint", first, "--cfg", 1.5],
        "classes": ["--checkpoint", first, "--classes", 4],
        "batch": ["--checkpoint", first, "--batch", 3],
        "resolution": ["--checkpoint", first, "--size", "32x64"],
    }
    for key, change in changes.items():
        options = base[:4] + (["--classes", 1, 2] if key != "classes" else []) + change
        status, lines = eval_cli(capsys, *options)
        assert status == 2 and lines == [
            f"pixelflow: error: --out {out}: its images were drawn with another {key} (see eval.json); use another "
            f"--out, or --redraw to draw them again"
        ]
        assert pngs(out) == drawn  # nothing drawn over them
    assert eval_cli(capsys, "--checkpoint", second, *base, "--redraw") == (0, [])
    assert pngs(out).keys() == drawn.keys() and pngs(out) != drawn
    assert json.loads((out / "eval.json").read_text())["checkpoint"]["path"].startswith(str(second))
    wide = tmp_path / "wide"  # an eval at a fixed non-square size
    assert eval_cli(capsys, "--checkpoint", first, "--out", wide, "--images", 2, "--size", "32x64") == (0, [])
    assert np.load(wide / "samples_2.npz")["arr_0"].shape == (2, 32, 64, 3)


def write_statistics(path, **changes) -> None:
    arrays = {"mu": np.zeros(2048), "sigma": np.eye(2048), **changes}
    np.savez(path, **arrays)


def test_eval_options_and_scoring_inputs_are_checked_before_anything_is_drawn(
    tmp_path, two_checkpoints, inception_file, capsys
):
    good, nan, misshapen = tmp_path / "good.npz", tmp_path / "nan.npz", tmp_path / "misshapen.npz"
    write_statistics(good)
    write_statistics(nan, mu=np.full(2048, np.nan))
    write_statistics(misshapen, sigma=np.eye(2048)[:, :3])
    (tmp_path / "file").write_text("a file")
    fid = ["--inception-weights", inception_file]
    cases = [
        (["--cfg", "nan"], "--cfg nan: must be a finite number >= 0"),
        (["--cfg", "-2"], "--cfg -2.0: must be a finite number >= 0"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--steps", "-1"], "--steps -1: must be at least 1"),
        (["--images", "1", "--reference", good, *fid], "--images 1: FID needs at least 2 images"),
        (["--reference", nan, *fid], f"--reference {nan}: mu holds values that are not finite numbers"),
        (["--reference", misshapen, *fid], f"--reference {misshapen}: sigma is (2048, 3), not (2048, 2048)"),
        (["--reference", tmp_path / "none.npz", *fid], f"--reference {tmp_path / 'none.npz'}: no such file"),
        (
            ["--reference", good, "--inception-weights", tmp_path / "none.pth"],
            f"--inception-weights {tmp_path / 'none.pth'}: no such file (pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)",
        ),
        (["--classifier", tmp_path / "none.pt"], f"--classifier {tmp_path / 'none.pt'}: no such file"),
        (["--out", tmp_path / "file"], f"--out {tmp_path / 'file'}: a file, not a folder"),
        (["--size", "30x64"], "--size 30x64: must be HEIGHTxWIDTH (or one side) in pixels, each a positive multiple"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        options = ["--checkpoint", two_checkpoints[0], "--out", out, "--images", 2, *extra]
        status, lines = eval_cli(capsys, *options)
        assert status == 2 and len(lines) == 1 and lines[0].startswith(f"pixelflow: error: {message}"), lines
        assert not out.exists()  # nothing made, nothing drawn
