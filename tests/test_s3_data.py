"""Ingest and streaming against a real S3 endpoint (moto_server on loopback), with injected faults."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_tools.ingest import Options, ingest
from pixelflow.config import DataConfig
from pixelflow.data.loader import DataStream, LaneReader, ReadSettings, merge_states
from pixelflow.data.shard_format import read_index, read_manifest
from pixelflow.data.storage import filesystem
from pixelflow.errors import StorageError
from tests.conftest import cli
from tests.s3 import FaultyProxy

BUCKET = "s3://pixelflow-test"


def save(path, image: Image.Image, fmt: str = "JPEG", **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def photo(seed: int, size=(60, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def s3_options(endpoint: str, fail_fast: bool = False) -> dict:
    """Options for s3fs; fail_fast turns off botocore's own retries (s3fs still retries SlowDown 5 times)."""
    options = {"endpoint_url": endpoint, "skip_instance_cache": True}
    if fail_fast:
        options["config_kwargs"] = {"retries": {"max_attempts": 1}}
    return options


def stored_keys(path: str, endpoint: str) -> list[str]:
    fs, root = filesystem(path, endpoint_url=endpoint)
    manifest = read_manifest(fs, root)
    return [e.key for s in manifest.shards for e in read_index(fs, root, s.name)]


def test_ingest_image_folder_with_every_kind_of_bad_input(tmp_path, s3_endpoint):
    root = tmp_path / "classes"
    save(root / "cat" / "a.jpg", photo(1))
    save(root / "cat" / "b.png", photo(2).convert("CMYK").convert("RGB"), "PNG")
    save(root / "cat" / "cmyk.jpg", photo(3).convert("CMYK"))
    save(root / "cat" / "deep.png", Image.fromarray(np.full((48, 60), 40000, dtype=np.uint16)), "PNG")
    save(root / "dog" / "palette.png", photo(4).convert("P"), "PNG")
    save(root / "dog" / "alpha.png", photo(5).convert("RGBA"), "PNG")
    rotated = photo(6, (60, 40))
    exif = rotated.getexif()
    exif[0x0112] = 6
    save(root / "dog" / "rotated.jpg", rotated, exif=exif.tobytes())
    save(root / "dog" / "tiny.jpg", photo(7, (10, 10)))
    save(root / "dog" / "banner.jpg", photo(8, (400, 40)))
    good = io.BytesIO()
    photo(9).save(good, format="JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(good.getvalue()[:300])
    (root / "dog" / "notes.jpg").write_text("not an image")
    output = f"{BUCKET}/imagefolder"
    report = ingest(
        root, output, options=Options(per_shard=4, min_size=32), endpoint_url=s3_endpoint.endpoint, progress=False
    )
    assert report.inputs == 11
    assert report.skipped == {"too_small": 1, "extreme_aspect": 1, "corrupt": 1, "not_an_image": 1}
    assert report.written == 7 and report.written + sum(report.skipped.values()) == report.inputs
    assert report.converted["converted_CMYK"] == 1 and report.converted["converted_I;16"] == 1
    assert report.converted["converted_P"] == 1 and report.converted["converted_RGBA"] == 1
    assert report.converted["exif_rotated"] == 1
    fs, base = filesystem(output, endpoint_url=s3_endpoint.endpoint)
    manifest = read_manifest(fs, base)
    assert manifest.num_classes == 2 and manifest.num_samples == 7
    entries = {e.key: e for s in manifest.shards for e in read_index(fs, base, s.name)}
    assert entries["dog-rotated"].width == 40 and entries["dog-rotated"].height == 60  # EXIF applied
    assert entries["cat-a"].label == 0 and entries["dog-palette"].label == 1


def test_ingest_captioned_folder_and_rerun_reuses_complete_shards(tmp_path, s3_endpoint):
    root = tmp_path / "captioned"
    for i in range(7):
        save(root / "sub" / f"img{i}.jpg", photo(10 + i))
        if i != 3:
            (root / "sub" / f"img{i}.txt").write_text(f"caption number {i}")
    save(root / "sub" / "img0.png", photo(30), "PNG")  # sanitises to img0.jpg's key; shares img0.txt
    output = f"{BUCKET}/captioned"
    options = Options(per_shard=3, min_size=16)
    first = ingest(root, output, options=options, endpoint_url=s3_endpoint.endpoint, progress=False)
    assert first.inputs == 8 and first.written == 7  # both img0 files, under distinct keys
    assert first.skipped == {"missing_caption": 1}
    fs, base = filesystem(output, endpoint_url=s3_endpoint.endpoint)
    fs.rm(f"{base}/shard-000001.index.json")  # as if the run died before committing shard 1
    again = ingest(root, output, options=options, endpoint_url=s3_endpoint.endpoint, progress=False)
    assert again.shards_reused == first.shards - 1
    assert (again.written, again.skipped) == (first.written, first.skipped)
    keys = sorted(stored_keys(output, s3_endpoint.endpoint))
    assert [k for k in keys if not k.startswith("sub-img0-")] == sorted(f"sub-img{i}" for i in range(7) if i != 3)
    assert len([k for k in keys if k.startswith("sub-img0-")]) == 1


@pytest.mark.parametrize("suffix", ["parquet", "jsonl", "csv"])
def test_ingest_tables(tmp_path, s3_endpoint, suffix):
    rows = []
    for i in range(5):
        save(tmp_path / "images" / f"p{i}.jpg", photo(40 + i))
        rows.append({"image": f"images/p{i}.jpg", "caption": f"photo {i}", "label": i % 2})
    rows.append({"image": "images/missing.jpg", "caption": "gone", "label": 0})
    rows.append({"image": "images/p1.jpg", "caption": "again", "label": 1})
    rows.append({"image": "images/p2.jpg", "caption": "", "label": 1})
    table = tmp_path / f"table.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), table)
    elif suffix == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["image", "caption", "label"])
            writer.writeheader()
            writer.writerows(rows)
    output = f"{BUCKET}/table-{suffix}"
    report_file = tmp_path / "report.json"
    command = [
        "data_tools",
        "ingest",
        str(table),
        output,
        "--endpoint-url",
        s3_endpoint.endpoint,
        "--report",
        str(report_file),
        "--min-size",
        "16",
        "--quiet",
    ]
    done = cli(*command)
    assert done.returncode == 0, done.stderr
    report = json.loads(report_file.read_text())
    assert report["inputs"] == 8 and report["written"] == 5
    assert report["skipped"] == {"unreadable": 1, "duplicate_key": 1, "missing_caption": 1}
    fs, base = filesystem(output, endpoint_url=s3_endpoint.endpoint)
    assert read_manifest(fs, base).num_classes == 2


@pytest.fixture(scope="module")
def s3_shapes(s3_endpoint):
    """64 samples in 8 equal shards on S3: 4 lanes get 16 samples each per epoch."""
    from data_tools.synthetic import write_synthetic_dataset

    path = f"{BUCKET}/shapes"
    write_synthetic_dataset(path, 64, 8, size=40, seed=2, storage_options={"endpoint_url": s3_endpoint.endpoint})
    return path


def stream(path, endpoint, rank=0, world=1, workers=2, state=None, options=None, batch=4, first_step=1, **data):
    """A data rank's share of global batches of `batch` samples from 4 lanes (`data`: more data.* values)."""
    data.setdefault("lanes", 4)
    return DataStream(
        DataConfig(path=path, resolution=32, num_workers=workers, shuffle_block=6, **data),
        global_batch=batch,
        seed=7,
        rank=rank,
        world_size=world,
        state=state,
        storage_options=options or s3_options(endpoint),
        first_step=first_step,
    )


def s3_data(path: str) -> DataConfig:
    """The data section stream() reads with."""
    return DataConfig(path=path, resolution=32, shuffle_block=6)


def take_keys(data: DataStream, batches: int) -> list[str]:
    return [key for _ in range(batches) for key in next(data).keys]


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(s3_endpoint, s3_shapes):
    everything = Counter(stored_keys(s3_shapes, s3_endpoint.endpoint))
    ranks = [stream(s3_shapes, s3_endpoint.endpoint, rank, 2) for rank in range(2)]
    for _ in range(2):  # two epochs: 4 lanes x 16 samples = 16 global batches of 4, read by 2 ranks
        seen = Counter(key for data in ranks for key in take_keys(data, 16))
        assert seen == everything


def test_resume_over_s3_continues_exactly(s3_endpoint, s3_shapes):
    reference = stream(s3_shapes, s3_endpoint.endpoint)
    expected = [next(reference) for _ in range(7)]
    first = stream(s3_shapes, s3_endpoint.endpoint)
    [next(first) for _ in range(3)]
    resumed = stream(s3_shapes, s3_endpoint.endpoint, state=first.state_dict(), first_step=4)
    for want in expected[3:]:
        got = next(resumed)
        assert got.keys == want.keys and torch.equal(got.images, want.images)


@pytest.mark.parametrize("new_world, new_workers", [(1, 2), (4, 1)])
def test_elastic_resume_neither_repeats_nor_skips(s3_endpoint, s3_shapes, new_world, new_workers):
    """4 lanes read by 2 ranks x 2 workers, resumed on another layout: what every rank reads, before and after,
    is exactly each lane's own sequence between its cursors."""
    before = [stream(s3_shapes, s3_endpoint.endpoint, rank, 2) for rank in range(2)]
    seen_before = Counter(key for data in before for key in take_keys(data, 3))
    middle = merge_states([data.state_dict() for data in before])
    after = [
        stream(s3_shapes, s3_endpoint.endpoint, rank, new_world, new_workers, middle, first_step=4)
        for rank in range(new_world)
    ]
    seen_after = Counter(key for data in after for key in take_keys(data, 5))
    end = merge_states([data.state_dict() for data in after])
    settings = ReadSettings(s3_data(s3_shapes), after[0].sources[0].manifest, 4, 7, s3_options(s3_endpoint.endpoint))
    [middle], [end] = middle["sources"], end["sources"]
    expected_before, expected_after = Counter(), Counter()
    for lane in range(4):
        samples = LaneReader(settings, lane).samples(0)
        truth = [next(samples).key for _ in range(end["positions"][lane])]
        expected_before.update(truth[: middle["positions"][lane]])
        expected_after.update(truth[middle["positions"][lane] :])
    assert seen_before == expected_before and seen_after == expected_after
    assert sum(seen_after.values()) == 4 * 5  # 5 global batches of 4, however many ranks read them


@pytest.mark.parametrize("mode, faults", [("503", 12), ("drop", 4)])  # s3fs itself retries 503s 5 times a read
def test_transient_faults_are_survived_with_nothing_lost(s3_endpoint, s3_shapes, mode, faults):
    clean = take_keys(stream(s3_shapes, s3_endpoint.endpoint, workers=0), 10)
    with FaultyProxy(s3_endpoint.port) as proxy:
        options = s3_options(proxy.endpoint, fail_fast=True)
        data = stream(s3_shapes, proxy.endpoint, workers=0, options=options, retries=6, retry_wait=0.01)
        proxy.fail(faults, mode)
        faulty = take_keys(data, 10)
        assert proxy.failures == faults
    assert faulty == clean


def test_persistent_failure_names_the_shard(s3_endpoint, s3_shapes):
    with FaultyProxy(s3_endpoint.port) as proxy:
        proxy.fail(10**6, "503")
        data = stream(
            s3_shapes,
            proxy.endpoint,
            workers=0,
            options=s3_options(proxy.endpoint, fail_fast=True),
            retries=2,
            retry_wait=0.01,
        )
        with pytest.raises(StorageError, match=r"reading shard pixelflow-test/shapes/shard-\d{6}\.tar: failed after 2"):
            next(data)


def test_lane_reader_reads_each_lane_epoch_from_s3(s3_endpoint, s3_shapes):
    fs, base = filesystem(s3_shapes, endpoint_url=s3_endpoint.endpoint)
    manifest = read_manifest(fs, base)
    settings = ReadSettings(s3_data(s3_shapes), manifest, 4, 7, s3_options(s3_endpoint.endpoint))
    keys = Counter()
    for lane in range(4):
        samples = LaneReader(settings, lane).samples(0)
        keys.update(next(samples).key for _ in range(16))
    assert keys == Counter(stored_keys(s3_shapes, s3_endpoint.endpoint))


def test_demo_trains_from_s3(tmp_path, s3_endpoint, s3_shapes):
    command = [
        "pixelflow",
        "train",
        "configs/demo.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"data.path={s3_shapes}",
        "train.steps=3",
        "train.global_batch=8",
        "model.depth=1",
        "data.num_workers=1",
        "--endpoint-url",
        s3_endpoint.endpoint,
    ]
    done = cli(*command)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "manifest.json").exists()
    assert "testing" not in done.stdout + done.stderr  # credentials never logged


def test_ingest_cli_reports_an_unusable_input_in_one_line(tmp_path):
    (tmp_path / "loose").mkdir()
    save(tmp_path / "loose" / "a.jpg", photo(1))
    for source, message in [
        (tmp_path / "nowhere", "input not found"),
        (tmp_path / "loose", "neither class folders nor images with .txt captions; give --kind"),
    ]:
        done = cli("data_tools", "ingest", source, tmp_path / "out")
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [f"pixelflow-data: error: {source}: {message}"]
