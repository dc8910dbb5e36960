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
