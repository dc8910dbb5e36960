"""Judging samples: the FID path (Inception features, statistics, Frechet distance, IS, precision/recall)
with a random-weight Inception file made here, and the synthetic-shapes classifier."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from pixelflow.errors import ConfigError
from pixelflow.quality.inception import load_inception
from pixelflow.quality.scores import Statistics, frechet_distance, inception_features, inception_scores


def blobs(count: int, seed: int) -> np.ndarray:
    """Smooth random colour fields (N, 32, 32, 3) uint8: different seeds give different distributions."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255 - 60 * (seed % 2), (count, 3, 4, 4)))
    return (
        torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
        .round()
        .byte()
        .permute(0, 2, 3, 1)
        .numpy()
    )


def closed_form_frechet(a: Statistics, b: Statistics) -> float:
    """The textbook formula with scipy's general matrix square root of S_a S_b (singular when there are fewer
    samples than features, which scipy warns of; its root is still accurate here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        product_root = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    return float(((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(product_root))


def test_frechet_distance_equals_the_closed_form_on_full_rank_statistics():
    rng = np.random.default_rng(0)
    a, b = (Statistics.of(rng.normal(0, scale, (200, 8)) + shift) for scale, shift in ((1.0, 0.0), (1.7, 0.4)))
    assert frechet_distance(a, b) == pytest.approx(closed_form_frechet(a, b), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9


@pytest.mark.slow
def test_fid_of_random_weight_inception_statistics_matches_closed_form_and_is_zero_against_itself(
    tmp_path, inception_file
):
    model = load_inception(inception_file)
    generated, other = blobs(8, 0), blobs(8, 1)
    np.savez(tmp_path / "reference.npz", arr_0=other)
    scores = inception_scores(generated, tmp_path / "reference.npz", inception_file)

    mine, theirs = inception_features(model, generated), inception_features(model, other)
    assert mine.pool.shape == (8, 2048) and mine.spatial.shape == (8, 7 * 17 * 17) and mine.logits.shape == (8, 1008)
    assert mine.pool.std() > 1e-3  # the random network passes signal through to the pool layer
    expected = closed_form_frechet(Statistics.of(mine.pool), Statistics.of(theirs.pool))
    assert scores["fid"] > 0 and scores["fid"] == pytest.approx(expected, rel=1e-4)
    spatial = closed_form_frechet(Statistics.of(mine.spatial), Statistics.of(theirs.spatial))
    assert scores["sfid"] == pytest.approx(spatial, rel=1e-4)
    assert 1.0 <= scores["inception_score"] <= 1008
    assert 0.0 <= scores["precision"] <= 1.0 and 0.0 <= scores["recall"] <= 1.0

    np.savez(tmp_path / "self.npz", arr_0=generated)
    itself = inception_scores(generated, tmp_path / "self.npz", inception_file)
    assert abs(itself["fid"]) < 1e-6 * scores["fid"] and abs(itself["sfid"]) < 1e-6 * scores["sfid"]
    assert itself["precision"] == 1.0 and itself["recall"] == 1.0

    statistics = Statistics.of(theirs.pool)  # an ADM-style reference of statistics only: same FID, no P/R
    np.savez(tmp_path / "stats.npz", mu=statistics.mu, sigma=statistics.sigma)
    from_statistics = inception_scores(generated, tmp_path / "stats.npz", inception_file)
    assert from_statistics["fid"] == pytest.approx(scores["fid"], rel=1e-9)
    assert "precision" not in from_statistics and "sfid" not in from_statistics


def test_missing_or_wrong_inception_weights_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file.*nothing is downloaded"):
        load_inception(tmp_path / "absent.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="not the FID Inception-v3"):
        load_inception(tmp_path / "wrong.pth")


@pytest.mark.slow
def test_shape_classifier_learns_the_synthetic_classes_and_loads_weights_only(tmp_path):
    from data_tools.classifier import render, train_classifier
    from pixelflow.quality.classifier import class_accuracy, load_classifier

    report = train_classifier(str(tmp_path / "classifier.pt"), steps=150, count=512)
    assert report.held_out_accuracy > 0.3  # 16 classes: chance is 1/16
    classifier = load_classifier(tmp_path / "classifier.pt")
    images, labels = render(64, 32, seed=7)
    accuracy = class_accuracy(classifier, images, labels)
    assert accuracy > 0.3
    assert class_accuracy(classifier, images, (labels + 1) % 16) < accuracy  # wrong labels score lower
    torch.save({"settings": {"num_classes": 16}, "state_dict": {}}, tmp_path / "broken.pt")
    with pytest.raises(ConfigError, match="broken.pt: not a classifier written by train-classifier"):
        load_classifier(tmp_path / "broken.pt")


def test_progress_prints_plain_lines_off_a_terminal_and_nothing_on_other_ranks(capsys, monkeypatch):
    from pixelflow.progress import Progress

    with Progress(4, "work", "img", initial=1, every_s=0.0) as bar:
        for _ in range(3):
            bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["work: 2/4 img", "work: 3/4 img", "work: 4/4 img"]
    assert "\r" not in "".join(lines)
    monkeypatch.setenv("RANK", "1")
    with Progress(4, "work", every_s=0.0) as bar:
        bar.update(4)
    assert capsys.readouterr().err == ""
