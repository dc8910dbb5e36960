"""`pixelflow-data index`: webdataset tars written by other tools train in place, unchanged."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

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

    one = train(tiny_config(tmp_path / "one", meta, "train.steps=4", "data.lanes=4")).run_dir
    overrides = tiny_overrides(tmp_path / "two", meta, "train.steps=4", "data.lanes=4", "parallel.dp_shard=2")
    run_ranks(["-m", "pixelflow", "train", "configs/demo.yaml", *overrides], 2)
    losses = [
        [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
        for run in (one, tmp_path / "two")
    ]
    assert len(losses[0]) == 4 and np.allclose(losses[0], losses[1], atol=1e-5, rtol=0)


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
