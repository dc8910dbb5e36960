"""`pixelflow-data index`: webdataset tars written by other tools train in place, unchanged."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.index import IndexOptions, index_dataset
from pixelflow.config import DataConfig
from pixelflow.data.loader import LaneReader, ReadSettings
from pixelflow.data.shard_format import member_key, read_index, read_manifest
from pixelflow.data.storage import filesystem
from pixelflow.train.trainer import train
from tests.conftest import cli, error_lines, run_ranks, tiny_config, tiny_overrides
from tests.s3 import CREDENTIALS, free_port
from tests.test_s3_data import BUCKET, s3_options

SHARDS, PER_SHARD = 4, 12


def jpeg(rng, width=48, height=40) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tars(folder: str, labels: bool, storage_options: dict | None = None) -> dict[str, dict]:
    """webdataset.TarWriter tars whose keys carry folders with dots (`train/v1.0/...`), with or without
    .cls labels; returns what each sample was written with."""
    fs, root = filesystem(folder, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    rng, written = np.random.default_rng(0), {}
    for shard in range(SHARDS):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer) as writer:
            for i in range(PER_SHARD):
                key = f"train/v1.0/{shard:03d}{i:04d}"
                sample = {"__key__": key, "jpg": jpeg(rng), "txt": f"a shape {shard} {i}"}
                meta = {"width": 48, "height": 40, "punsafe": (i % 4) / 4}
                sample["json"] = json.dumps(meta).encode()
                if labels:
                    sample["cls"] = str((shard * PER_SHARD + i) % 5)
                writer.write(sample)
                written[key] = {"label": (shard * PER_SHARD + i) % 5 if labels else None, "caption": sample["txt"]}
        fs.pipe_file(f"{root}/part-{shard:03d}.tar", buffer.getvalue())
    return written


def checksums(folder: str, storage_options: dict | None = None) -> dict[str, str]:
    fs, root = filesystem(folder, **(storage_options or {}))
    return {path.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat_file(path)).hexdigest() for path in fs.ls(root, False)}


def read_back(meta: str, storage_options: dict | None = None) -> dict[str, tuple]:
    """key -> (label, caption) as the training loader reads them."""
    fs, root = filesystem(meta, **(storage_options or {}))
    manifest = read_manifest(fs, root)
    settings = ReadSettings(DataConfig(path=meta, resolution=32), manifest, 1, 0, storage_options or {}, "captions")
    samples = LaneReader(settings, 0).samples(0)
    out = {}
    for _ in range(manifest.num_samples):
        sample = next(samples)
        out[sample.key] = (sample.label if sample.label >= 0 else None, sample.payload.decode())
    return out


def assert_one_process_trains_as_two_ranks(tmp_path, data, steps: int, lanes: int) -> None:
    """The tiny demo model trained on `data` in this process and on 2 ranks (dp_shard=2): the same losses."""
    extra = (f"train.steps={steps}", f"data.lanes={lanes}")
    one = train(tiny_config(tmp_path / "one", data, *extra)).run_dir
    overrides = tiny_overrides(tmp_path / "two", data, *extra, "parallel.dp_shard=2")
    run_ranks(["-m", "pixelflow", "train", "configs/demo.yaml", *overrides], 2)
    losses = [
        [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
        for run in (one, tmp_path / "two")
    ]
    assert len(losses[0]) == steps and np.allclose(losses[0], losses[1], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("labels", [True, False])
def test_shardwriter_tars_with_folders_in_member_names_train_in_place_on_one_and_two_ranks(tmp_path, labels):
    tars, meta = str(tmp_path / "tars"), str(tmp_path / "meta")
    written = write_tars(tars, labels)
    before = checksums(tars)
    report = index_dataset(tars, meta, IndexOptions(where=("punsafe<0.7",)))
    assert checksums(tars) == before  # not a byte of the tars changed, nothing was added beside them
    assert report.inputs == SHARDS * PER_SHARD and report.written + sum(report.skipped.values()) == report.inputs
    assert report.skipped == {"where_punsafe": SHARDS * PER_SHARD // 4}  # punsafe 0.75 is filtered out
    kept = {key: (v["label"], v["caption"]) for key, v in written.items() if int(key[-4:]) % 4 != 3}
    assert read_back(meta) == kept  # keys with folders, labels and captions as the tars hold them

    assert_one_process_trains_as_two_ranks(tmp_path, meta, steps=4, lanes=4)


def test_tars_on_s3_index_with_the_metadata_in_another_bucket_and_stay_untouched(tmp_path, s3_endpoint):
    options = s3_options(s3_endpoint.endpoint)
    fs, tars_root = filesystem(f"{BUCKET}/adopted/tars", **options)
    if not fs.exists("pixelflow-meta"):
        fs.mkdir("pixelflow-meta")
    tars, meta = f"{BUCKET}/adopted/tars", "s3://pixelflow-meta/adopted"
    written = write_tars(tars, labels=True, storage_options=options)
    before = checksums(tars, options)
    report = index_dataset(tars, meta, storage_options=options)
    assert report.written == SHARDS * PER_SHARD and report.skipped == {}
    assert checksums(tars, options) == before
    meta_fs, meta_root = filesystem(meta, **options)
    manifest = read_manifest(meta_fs, meta_root)
    assert manifest.location == tars and manifest.num_classes == 5
    assert read_back(meta, options) == {key: (v["label"], v["caption"]) for key, v in written.items()}

    again = index_dataset(tars, meta, storage_options=options)
    assert again.shards_reused == SHARDS and again.written == report.written
    rng = np.random.default_rng(1)  # one tar rewritten with fewer samples: only it is indexed again
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        writer.write({"__key__": "lone", "png": jpeg(rng), "cls": "1"})
    fs.pipe_file(f"{tars_root}/part-001.tar", buffer.getvalue())
    changed = index_dataset(tars, meta, storage_options=options)
    assert changed.shards_reused == SHARDS - 1 and changed.written == report.written - PER_SHARD + 1
    assert [e.key for e in read_index(meta_fs, meta_root, "part-001.tar")] == ["lone"]


def test_damaged_tars_count_every_sample_by_reason_and_an_empty_result_is_an_error(tmp_path, capsys):
    tars = tmp_path / "tars"
    write_tars(str(tars), labels=True)
    data = (tars / "part-000.tar").read_bytes()
    cut = len(data) // 2 + 100  # inside a sample
    (tars / "part-000.tar").write_bytes(data[:cut])
    ends: dict[str, int] = {}  # each sample's end in the whole tar, by the standard library's reading
    with tarfile.open(fileobj=io.BytesIO(data)) as whole:
        for member in whole.getmembers():
            ends[member_key(member.name)[0]] = member.offset_data + -(-member.size // 512) * 512
    # a sample is known whole once the next sample's first header (512 bytes after it) was read
    whole_before_cut = sum(end + 512 <= cut for end in ends.values())
    rng = np.random.default_rng(2)
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        writer.write({"__key__": "broken", "jpg": b"\xff\xd8 not an image", "cls": "0"})
        writer.write({"__key__": "textonly", "txt": "no image here"})
        writer.write({"__key__": "badlabel", "jpg": jpeg(rng), "cls": "minus one"})
        writer.write({"__key__": "tiny", "jpg": jpeg(rng, 8, 8)})
    (tars / "part-001.tar").write_bytes(buffer.getvalue())
    report = index_dataset(str(tars), str(tmp_path / "meta"), IndexOptions(min_size=16))
    assert report.skipped == {
        "truncated_tar": 1,
        "corrupt_image": 1,
        "missing_image": 1,
        "bad_label": 1,
        "too_small": 1,
    }
    assert report.written + sum(report.skipped.values()) == report.inputs
    assert 0 < whole_before_cut < PER_SHARD and report.written == whole_before_cut + 2 * PER_SHARD

    assert cli("data_tools", "index", tars, "--meta", tmp_path / "m2", "--min-size", "1000").returncode == 2
    done = cli("data_tools", "index", tars, "--meta", tmp_path / "m3", "--where", "punsafe~1")
    assert done.returncode == 2
    [line] = error_lines(done.stderr, "pixelflow-data")
    assert line.startswith("pixelflow-data: error: --where 'punsafe~1': must be FIELD OP NUMBER")
    nothing = cli("data_tools", "index", tars, "--meta", tmp_path / "m4", "--min-size", "1000", "--quiet")
    [line] = error_lines(nothing.stderr, "pixelflow-data")
    assert line.startswith(f"pixelflow-data: error: {tars}: nothing indexed: ") and "too_small" in line
    assert not (tmp_path / "m4" / "manifest.json").exists()
    pattern = f"{tars}/part-{{000..002}}.tar"  # part-002.tar is there; part-003 is left out; none is missing
    assert cli("data_tools", "index", pattern, "--meta", tmp_path / "m5", "--quiet").returncode == 0
    gone = cli("data_tools", "index", f"{tars}/part-{{003..004}}.tar", "--meta", tmp_path / "m6", "--quiet")
    [line] = error_lines(gone.stderr, "pixelflow-data")
    assert line == f"pixelflow-data: error: {tars}/part-004.tar: tar not found"


def test_json_sizes_that_disagree_with_the_image_headers_are_replaced_by_the_headers(tmp_path):
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:  # the json claims 64 x 64; the images are 48 x 40
        for i in range(3):
            writer.write({"__key__": f"s{i}", "jpg": jpeg(rng), "json": json.dumps({"width": 64, "height": 64})})
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "a.tar").write_bytes(buffer.getvalue())
    report = index_dataset(str(tmp_path / "tars"))
    assert report.written == 3 and report.skipped == {}
    fs, root = filesystem(str(tmp_path / "tars"))
    assert {(e.width, e.height) for e in read_index(fs, root, "a.tar")} == {(48, 40)}


@pytest.fixture(scope="module")
def img2dataset_output(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, str]]]:
    """img2dataset's real webdataset output (3 tars, .parquet and _stats.json beside them) of 30 generated
    images served by `python -m http.server` on 127.0.0.1, with a caption and a label column; and what
    each sample was written with, read from the tars by the standard library."""
    root = tmp_path_factory.mktemp("img2dataset")
    (root / "www").mkdir()
    rng, port = np.random.default_rng(4), free_port()
    with open(root / "urls.csv", "w", newline="") as handle:
        table = csv.writer(handle)
        table.writerow(["url", "caption", "label"])
        for i in range(30):
            size = (64 + 8 * (i % 3), 48 + 8 * (i % 2))
            Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(root / "www" / f"{i}.png")
            table.writerow([f"http://127.0.0.1:{port}/{i}.png", f"picture {i}", i % 4])
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root / "www")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        command = [str(Path(sys.executable).parent / "img2dataset"), "--url_list", str(root / "urls.csv")]
        command += ["--input_format", "csv", "--url_col", "url", "--caption_col", "caption"]
        command += ["--save_additional_columns", '["label"]', "--output_format", "webdataset"]
        command += ["--output_folder", str(root / "out"), "--processes_count", "1", "--thread_count", "4"]
        command += ["--image_size", "32", "--resize_mode", "keep_ratio", "--number_sample_per_shard", "12"]
        command += ["--enable_wandb", "False", "--distributor", "multiprocessing"]
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # nothing reaches the network
        done = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.terminate()
        server.wait()
    written = {}
    for tar in sorted((root / "out").glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(archive.extractfile(member).read())  # type: ignore[union-attr]
                    written[meta["key"]] = (meta["label"], meta["caption"])
    assert len(written) == 30 and {label for label, _ in written.values()} == {0, 1, 2, 3}
    return root / "out", written


def wait_for_port(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@pytest.mark.slow
def test_img2dataset_output_trains_in_place_with_its_labels_and_captions(tmp_path, img2dataset_output):
    out, written = img2dataset_output
    before = checksums(str(out))
    done = cli("data_tools", "index", out, "--label-field", "label", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["inputs"] == report["written"] == 30 and report["shards"] == 3
    after = checksums(str(out))
    assert {name: after[name] for name in before} == before  # tars, parquet and stats untouched
    assert sorted(set(after) - set(before)) == [
        "00000.index.json",
        "00001.index.json",
        "00002.index.json",
        "manifest.json",
    ]
    assert read_back(str(out)) == written

    assert_one_process_trains_as_two_ranks(tmp_path, out, steps=3, lanes=3)


@pytest.mark.slow
def test_img2dataset_output_on_s3_indexes_with_its_metadata_in_another_bucket(img2dataset_output, s3_endpoint):
    out, written = img2dataset_output
    options = s3_options(s3_endpoint.endpoint)
    fs, _ = filesystem(BUCKET, **options)
    if not fs.exists("pixelflow-meta"):
        fs.mkdir("pixelflow-meta")
    tars = f"{BUCKET}/img2dataset"
    for path in sorted(out.iterdir()):
        if not path.name.endswith(".index.json") and path.name != "manifest.json":  # img2dataset's own files
            fs.pipe_file(f"{tars.removeprefix('s3://')}/{path.name}", path.read_bytes())
    before = checksums(tars, options)
    meta = "s3://pixelflow-meta/img2dataset"
    command = ["data_tools", "index", tars, "--meta", meta, "--label-field", "label", "--workers", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **CREDENTIALS}
    done = cli(*command, "--endpoint-url", s3_endpoint.endpoint, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["written"] == 30
    assert checksums(tars, options) == before  # the source bucket holds exactly what it held
    assert read_back(meta, options) == written
