"""`pixelflow-data ingest` of tables as labs have them: Hub-layout parquet (image bytes + label, no caption)
in a folder or a glob, read one row group at a time; tables of s3:// paths; nothing readable is an error."""

from __future__ import annotations

import io
import json
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_tools.ingest import ingest
from pixelflow.data.shard_format import read_index, read_manifest
from pixelflow.data.storage import filesystem
from tests.conftest import cli, error_lines
from tests.test_s3_data import BUCKET, s3_options

NAMES = ["tench", "goldfish", "shark"]


def png(seed: int, size=(40, 32)) -> bytes:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_hub_parquet(path, first: int, count: int, broken: dict[int, bytes | None]) -> None:
    """The Hub's image-classification layout: image struct<bytes, path>, label int, ClassLabel names in
    the schema metadata; rows in groups of 4."""
    images = [{"bytes": broken.get(i, png(i)), "path": f"n{i:05d}.png"} for i in range(first, first + count)]
    table = pa.table({"image": images, "label": [i % 3 for i in range(first, first + count)]})
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": NAMES}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path, row_group_size=4)


def test_hub_parquet_folders_and_globs_ingest_with_their_labels_and_class_names(tmp_path):
    folder = tmp_path / "imagenet" / "data"
    folder.mkdir(parents=True)
    write_hub_parquet(folder / "train-00000-of-00002.parquet", 0, 10, {3: b"not an image"})
    write_hub_parquet(folder / "train-00001-of-00002.parquet", 10, 10, {12: None})
    for source, out in [(folder, tmp_path / "from-folder"), (folder / "train-*.parquet", tmp_path / "from-glob")]:
        report = ingest(source, str(out), options=ingest_options(), progress=False)
        assert report.inputs == 20 and report.written == 18
        assert report.skipped == {"not_an_image": 1, "empty_image": 1}
        fs, root = filesystem(str(out))
        manifest = read_manifest(fs, root)
        assert manifest.num_classes == 3 and json.loads(fs.cat_file(f"{root}/manifest.json"))["classes"] == NAMES
        labels = {e.key: e.label for s in manifest.shards for e in read_index(fs, root, s.name)}
        assert labels == {f"n{i:05d}": i % 3 for i in range(20) if i not in (3, 12)}


def ingest_options():
    from data_tools.ingest import Options

    return Options(min_size=16, per_shard=8)


def test_a_table_of_s3_paths_ingests_and_counts_the_missing_object(tmp_path, s3_endpoint):
    options = s3_options(s3_endpoint.endpoint)
    fs, root = filesystem(f"{BUCKET}/raw-images", **options)
    for i in range(5):
        fs.pipe_file(f"{root}/{i}.png", png(100 + i))
    rows = [f"{BUCKET}/raw-images/{i}.png,{i % 2}" for i in range(5)] + [f"{BUCKET}/raw-images/gone.png,0"]
    (tmp_path / "table.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    done = cli("data_tools", "ingest", tmp_path / "table.csv", tmp_path / "out", "--min-size", "16", "--quiet",
               "--endpoint-url", s3_endpoint.endpoint)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["inputs"] == 6 and report["written"] == 5 and report["skipped"] == {"unreadable": 1}


def test_a_table_where_nothing_is_readable_exits_non_zero_in_one_line(tmp_path):
    (tmp_path / "table.csv").write_text("image,caption\nnone1.png,a\nnone2.png,b\n")
    done = cli("data_tools", "ingest", tmp_path / "table.csv", tmp_path / "out", "--quiet")
    assert done.returncode == 2
    [line] = error_lines(done.stderr, "pixelflow-data")
    assert (
        line
        == f"pixelflow-data: error: {tmp_path / 'table.csv'}: nothing written: 2 inputs, none usable (unreadable 2)"
    )
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_class_folders_captioned_folders_and_tables_on_s3_ingest_as_they_would_locally(
    tmp_path, s3_endpoint, monkeypatch
):
    temporary = tmp_path / "tmp"  # where the table on S3 is copied while it is ingested
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    options = s3_options(s3_endpoint.endpoint)
    fs, root = filesystem(f"{BUCKET}/raw", **options)
    for i in range(6):
        fs.pipe_file(f"{root}/classes/{'cat' if i % 2 else 'dog'}/{i}.png", png(200 + i))
        fs.pipe_file(f"{root}/captioned/{i}.png", png(300 + i))
        if i != 5:  # one image without its caption
            fs.pipe_file(f"{root}/captioned/{i}.txt", f"picture {i}".encode())
        fs.pipe_file(f"{root}/table/images/{i}.png", png(400 + i))
    fs.pipe_file(
        f"{root}/table/rows.csv", ("image,caption\n" + "".join(f"images/{i}.png,p {i}\n" for i in range(6))).encode()
    )
    endpoint = s3_endpoint.endpoint
    from data_tools.ingest import Options

    for source, written, skipped in [
        ("classes", 6, {}),
        ("captioned", 5, {"missing_caption": 1}),
        ("table/rows.csv", 6, {}),
    ]:
        out = tmp_path / source.replace("/", "-")
        report = ingest(
            f"{BUCKET}/raw/{source}", str(out), options=Options(min_size=16), endpoint_url=endpoint, progress=False
        )
        assert (report.inputs, report.written, report.skipped) == (6, written, skipped), source
        assert list(temporary.iterdir()) == [], source  # the table's local copy is gone
    out_fs, out_root = filesystem(str(tmp_path / "classes"))
    manifest = json.loads(out_fs.cat_file(f"{out_root}/manifest.json"))
    assert manifest["classes"] == ["cat", "dog"] and manifest["num_classes"] == 2
    labels = {
        e.key: e.label for s in read_manifest(out_fs, out_root).shards for e in read_index(out_fs, out_root, s.name)
    }
    assert labels == {f"{'cat' if i % 2 else 'dog'}-{i}": i % 2 ^ 1 for i in range(6)}
    missing = cli("data_tools", "ingest", f"{BUCKET}/raw/nothing", tmp_path / "x", "--endpoint-url", endpoint)
    [line] = error_lines(missing.stderr, "pixelflow-data")
    assert line == f"pixelflow-data: error: {BUCKET}/raw/nothing: input not found"
