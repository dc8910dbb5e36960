"""Mixtures of datasets (data.sources): exact shares per step, each source read through its own lanes, the
same batches on any layout, and resume, SIGKILL and reshard as exact as for one dataset."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_tools.synthetic import write_synthetic_dataset
from pixelflow.config import DataConfig, SourceConfig
from pixelflow.data.loader import DataStream, LaneReader, ReadSettings, merge_states
from pixelflow.data.mixture import Mixture, saved_sources, schedule
from pixelflow.data.shard_format import Manifest, read_manifest
from pixelflow.data.storage import filesystem
from pixelflow.errors import ConfigError
from tests.conftest import cli, error_lines, tiny_config, tiny_overrides
from tests.test_fault_tolerance import kill_tree, logged_step, losses, run_to_end, start_torchrun, wait_for


@pytest.fixture(scope="module")
def second_dataset(tmp_path_factory) -> Path:
    """64 other synthetic samples (other images) in 4 shards of 16."""
    root = tmp_path_factory.mktemp("second") / "second"
    write_synthetic_dataset(str(root), count=64, per_shard=16, size=40, seed=9)
    return root


def mixture(first: Path, second: Path, weights=(3, 1), **data) -> DataConfig:
    sources = [SourceConfig(path=str(first), weight=weights[0]), SourceConfig(path=str(second), weight=weights[1])]
    return DataConfig(**{"sources": sources, "resolution": 32, "shuffle_block": 8, "num_workers": 0, **data})


def stream(data: DataConfig, rank=0, world=1, state=None, first_step=1) -> DataStream:
    return DataStream(data, global_batch=8, seed=4, rank=rank, world_size=world, state=state, first_step=first_step)


def lane_truth(data: DataConfig, source: int, lanes: int, lane: int, count: int) -> list[str]:
    """The first `count` keys of one source's lane, read on their own."""
    path = data.sources[source].path
    fs, root = filesystem(path)
    settings = ReadSettings(DataConfig(path=path, resolution=32, shuffle_block=8), read_manifest(fs, root), lanes, 4)
    samples = LaneReader(settings, lane).samples(0)
    return [next(samples).key for _ in range(count)]


def test_each_step_takes_exact_shares_and_one_source_reads_as_before():
    three_to_one = Mixture(batch=8, weights=(3.0, 1.0), lanes=(4, 2), seed=0)
    assert all(three_to_one.counts(step).tolist() == [6, 2] for step in range(1, 50))
    uneven = Mixture(batch=8, weights=(2.0, 1.0), lanes=(4, 2), seed=0)  # 5.33 and 2.67 samples
    counts = np.array([uneven.counts(step) for step in range(1, 200)])
    assert set(counts[:, 0]) == {5, 6} and set(counts[:, 1]) == {2, 3} and (counts.sum(1) == 8).all()
    slots = next(schedule(three_to_one, 1, np.zeros(2, dtype=np.int64)))
    assert slots.sources.tolist() == [0] * 6 + [1] * 2
    assert slots.lanes.tolist() == [0, 1, 2, 3, 0, 1, 4, 5]  # the second source's lanes follow the first's
    one = schedule(Mixture(batch=8, weights=(1.0,), lanes=(5,), seed=0), 1, np.zeros(1, dtype=np.int64))
    for step, slots in zip(range(1, 20), one):  # one dataset: slot j of step s is sample (s - 1) x 8 + j
        assert slots.lanes.tolist() == [((step - 1) * 8 + j) % 5 for j in range(8)]
        assert slots.taken.tolist() == [step * 8]


def test_a_mixture_reads_each_source_through_its_own_lanes(shapes_dataset, second_dataset):
    data = mixture(shapes_dataset, second_dataset, lanes=2)
    reader = stream(data)
    shares = [next(reader) for _ in range(6)]
    assert all(share.batch_sources.tolist() == [0] * 6 + [1] * 2 for share in shares)
    for source, per_step in ((0, 6), (1, 2)):
        truth = [lane_truth(data, source, 2, lane, 6 * per_step // 2) for lane in range(2)]
        first = 0 if source == 0 else 6
        got = [key for share in shares for key in share.keys[first : first + per_step]]
        assert got == [truth[n % 2][n // 2] for n in range(6 * per_step)]  # sample n from lane n mod 2
    assert [entry["taken"] for entry in reader.state_dict()["sources"]] == [36, 12]


@pytest.mark.parametrize("ranks, workers", [(2, 0), (3, 2)])
def test_a_mixture_gives_the_same_batches_on_any_layout_and_resumes_exactly(
    shapes_dataset, second_dataset, ranks, workers
):
    data = mixture(shapes_dataset, second_dataset, lanes=2)
    one = stream(data)
    want = [next(one) for _ in range(7)]
    layout = mixture(shapes_dataset, second_dataset, lanes=2, num_workers=workers)
    spread = [stream(layout, rank, ranks) for rank in range(ranks)]
    for step in range(3):
        pieces = [next(reader) for reader in spread]
        by_slot = {int(slot): key for piece in pieces for slot, key in zip(piece.slots, piece.keys)}
        assert [by_slot[slot] for slot in range(8)] == want[step].keys
    state = merge_states([reader.state_dict() for reader in spread])
    assert state == one_state_after(data, 3)
    for reader in spread:
        reader.close()
    resumed = stream(data, state=state, first_step=4)  # 3 ranks -> 1, at step 4
    for share in want[3:]:
        got = next(resumed)
        assert got.keys == share.keys and bool((got.images == share.images).all())


def one_state_after(data: DataConfig, steps: int) -> dict:
    reader = stream(data)
    for _ in range(steps):
        next(reader)
    return reader.state_dict()


def test_resume_matches_sources_by_name_and_says_what_changed(caplog):
    a, b, c = (SourceConfig(path=f"/data/{name}") for name in "abc")
    saved = {"sources": [{"name": "a", "num_lanes": 2, "positions": [3, 3], "taken": 6}, {"name": "b", "taken": 2}]}
    with caplog.at_level(logging.WARNING, logger="pixelflow.data.mixture"):
        assert saved_sources([c, a], saved, quiet=False) == [None, saved["sources"][0]]
    assert [r.getMessage() for r in caplog.records] == [
        "data.sources: c is new to this run: read from its beginning",
        "data.sources: b was read before and is no longer in the mixture",
    ]
    moved = SourceConfig(path="/elsewhere/imagenet")  # one dataset takes the one saved state, wherever it is now
    old = {"num_lanes": 4, "positions": [1, 2, 3, 4]}  # written before mixtures
    assert saved_sources([moved], old) == [{**old, "name": None, "taken": None}]


def test_class_and_text_sources_do_not_mix(tmp_path, shapes_dataset):
    text = tmp_path / "captions"
    shutil.copytree(shapes_dataset, text)
    fs, root = filesystem(str(text))
    manifest = read_manifest(fs, root)
    (text / "manifest.json").write_text(Manifest(manifest.shards).to_json())  # captions only, no classes
    with pytest.raises(ConfigError) as error:
        stream(mixture(shapes_dataset, text))
    assert str(error.value) == (
        f"data.sources: {shapes_dataset} has class labels but {text} has none (a text dataset): class and text "
        f"sources do not mix in one run"
    )


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["data.sources=[{path: /a}]"], "'data.sources' and data.path are two ways to name the data: give one"),
        (["data.path=''"], "'data.path' must name a dataset directory or s3:// prefix"),
        (["data.path=''", "data.sources=[{path: /a, weight: 0}]"], "'data.sources.0.weight' = 0.0 must be a positive"),
        (
            ["data.path=''", "data.sources=[{path: /x/a}, {path: /y/a}]"],
            "'data.sources.1.name' = 'a' names two sources (give each its own name)",
        ),
        (
            ["data.path=''", "data.sources=[{path: /a}]", "text.embeddings=/e"],
            "'text.embeddings' names one dataset's embeddings: with data.sources give each source its own",
        ),
    ],
)
def test_a_wrong_mixture_is_one_line(tmp_path, overrides, line):
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path / "run", tmp_path / "data", *overrides)
    assert line in str(error.value) and "\n" not in str(error.value)


def mixture_args(run_dir: Path, first: Path, second: Path, steps: int, *extra: str) -> list[str]:
    sources = f"data.sources=[{{path: {first}, weight: 3, name: shapes}}, {{path: {second}, name: second}}]"
    overrides = tiny_overrides(run_dir, first, "data.path=''", sources, "data.lanes=2", f"train.steps={steps}")
    return ["-m", "pixelflow", "train", "configs/demo.yaml", *overrides, "checkpoint.every=2", *extra]


def step_keys(run_dir: Path) -> dict[int, list[str]]:
    """The keys each step trained, over every data rank."""
    out: dict[int, list[str]] = {}
    for log in (run_dir / "sample_keys").glob("*.jsonl"):
        for line in log.open():
            record = json.loads(line)
            out.setdefault(record["step"], []).extend(record["keys"])
    return {step: sorted(keys) for step, keys in sorted(out.items())}


@pytest.fixture(scope="module")
def two_rank_mixture(tmp_path_factory, shapes_dataset, second_dataset) -> Path:
    run_dir = tmp_path_factory.mktemp("mixture") / "run"
    run_to_end(mixture_args(run_dir, shapes_dataset, second_dataset, 8, "train.log_sample_keys=true"))
    return run_dir


@pytest.mark.slow
def test_a_mixture_trains_alike_on_one_process_and_two_ranks(
    tmp_path, shapes_dataset, second_dataset, two_rank_mixture
):
    one = tmp_path / "one"
    run_to_end(mixture_args(one, shapes_dataset, second_dataset, 8, "train.log_sample_keys=true"), 1)
    assert step_keys(one) == step_keys(two_rank_mixture)
    want, got = losses(one), losses(two_rank_mixture)
    assert len(want) == 8 and all(abs(a - b) <= 1e-5 * b for a, b in zip(got, want))
    records = [json.loads(line) for line in (two_rank_mixture / "metrics.jsonl").open()]
    assert all(record["loss_source_shapes"] > 0 and record["loss_source_second"] > 0 for record in records)
    assert [(r["share_source_shapes"], r["share_source_second"]) for r in records] == [(0.75, 0.25)] * 8


@pytest.mark.slow
def test_a_mixture_resumes_exactly_after_sigkill_and_reshards_from_two_ranks_to_one(
    tmp_path, shapes_dataset, second_dataset, two_rank_mixture
):
    run_dir = tmp_path / "killed"
    args = mixture_args(run_dir, shapes_dataset, second_dataset, 8, "train.log_sample_keys=true")
    job = start_torchrun(args)
    try:
        wait_for(lambda: logged_step(run_dir) >= 5, "step 5")
    finally:
        kill_tree(job.pid)
        job.wait()
    run_to_end(args)
    assert losses(run_dir) == losses(two_rank_mixture)
    assert step_keys(run_dir) == step_keys(two_rank_mixture)

    resharded = tmp_path / "resharded"  # the two-rank run's step 4, continued on one process
    shutil.copytree(two_rank_mixture, resharded)
    for folder in (resharded / "checkpoints").glob("step_*"):
        if int(folder.name[5:]) > 4:
            shutil.rmtree(folder)
    run_to_end(mixture_args(resharded, shapes_dataset, second_dataset, 8, "train.log_sample_keys=true"), 1)
    assert step_keys(resharded) == step_keys(two_rank_mixture)
    want, got = losses(two_rank_mixture), losses(resharded)
    assert len(got) == 8 and all(abs(a - b) <= 1e-5 * b for a, b in zip(got, want))


def test_a_mixture_error_reaches_the_command_line_as_one_line(tmp_path, shapes_dataset):
    done = cli(
        "pixelflow",
        "train",
        "configs/demo.yaml",
        *mixture_args(tmp_path / "run", shapes_dataset, tmp_path / "nothing", 2)[4:],
    )
    assert done.returncode != 0
    [line] = error_lines(done.stderr)
    assert str(tmp_path / "nothing") in line


def test_a_data_state_written_before_mixtures_resumes_the_same(shapes_dataset):
    data = DataConfig(path=str(shapes_dataset), resolution=32, shuffle_block=8, num_workers=0, lanes=5)
    first = stream(data)
    for _ in range(3):
        next(first)
    [saved] = first.state_dict()["sources"]
    old = {"num_lanes": saved["num_lanes"], "positions": saved["positions"]}  # the format of earlier versions
    for state in ({"sources": [saved]}, old):
        resumed, reference = stream(data, state=state, first_step=4), stream(data)
        for _ in range(3):
            next(reference)
        for _ in range(3):
            assert next(resumed).keys == next(reference).keys


def test_each_source_reads_its_captions_its_own_way(tmp_path, shapes_dataset, second_dataset):
    """Captions travel from every source, each read as its manifest says (.txt, or a field of the .json)."""
    from_json = tmp_path / "from_json"
    shutil.copytree(second_dataset, from_json)
    fs, root = filesystem(str(from_json))
    manifest = read_manifest(fs, root)
    (from_json / "manifest.json").write_text(
        Manifest(manifest.shards, manifest.num_classes, caption_field="source").to_json()
    )
    data = mixture(shapes_dataset, from_json, lanes=2)
    share = next(DataStream(data, global_batch=8, seed=4, text="captions"))
    assert [p.startswith(b"a ") for p in share.payloads[:6]] == [True] * 6
    assert share.payloads[6:] == [b"synthetic"] * 2  # the json's "source" field
