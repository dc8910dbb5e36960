"""Hostile and broken input: one clear line naming what and where, nothing written, nothing applied."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from data_tools.synthetic import write_synthetic_dataset
from pixelflow.cli import main, run_command
from pixelflow.config import load_config
from pixelflow.errors import ConfigError, NonFiniteError, ShardFormatError
from pixelflow.train.trainer import train
from pixelflow.weights import committed_checkpoints, read_weights
from tests.conftest import REPO, cli, tiny_config, tiny_overrides
from tests.conftest import error_lines as errors_in
from tests.s3 import free_port


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("pixelflow")]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=inf", "'train.lr' = inf must be a finite number"),
        ("train.betas=[0.9,nan]", "'train.betas' = [0.9, nan] must be a finite number"),
        ("sample.guidance_scale=-inf", "'sample.guidance_scale' = -inf must be a finite number"),
    ],
)
def test_non_finite_config_numbers_are_config_errors(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs" / "demo.yaml", [override])
    assert str(error.value) == f"command line override: {message}"


def all_finite(run_dir) -> bool:
    return all(
        all(bool(torch.isfinite(t).all()) for t in read_weights(folder, which)[0].values())
        for folder in committed_checkpoints(run_dir / "checkpoints")
        for which in ("model", "ema")
    )


def test_a_diverging_run_stops_naming_the_step_and_commits_no_non_finite_weights(tmp_path, shapes_dataset):
    cfg = tiny_config(tmp_path / "run", shapes_dataset, "train.lr=1e30", "train.warmup_steps=0", "checkpoint.every=1")
    with pytest.raises(NonFiniteError, match=r"^step 2: the loss or gradient is not finite \(grad norm nan\)"):
        train(cfg)
    assert [p.name for p in committed_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000001"]
    assert all_finite(tmp_path / "run")


def test_skip_step_skips_non_finite_steps_and_never_applies_them(tmp_path, shapes_dataset):
    overrides = ["train.lr=1e30", "train.warmup_steps=0", "checkpoint.every=2", "train.nonfinite=skip_step"]
    result = train(tiny_config(tmp_path / "run", shapes_dataset, *overrides))
    assert result.step == 6
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in records] == [0, 1, 1, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all_finite(result.run_dir)


def test_a_run_directory_that_is_a_file_is_one_line_and_stays_as_it_was(tmp_path, shapes_dataset, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    assert main(["train", "configs/demo.yaml", *tiny_overrides(blocker, shapes_dataset)]) == 2
    assert error_lines(capsys) == [
        f"pixelflow: error: run_dir: {blocker}/checkpoints: cannot write the run directory (Not a directory)"
    ]
    assert blocker.read_text() == "not a directory"


def test_a_bad_dataset_path_stops_before_the_run_directory_is_made(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "configs/demo.yaml", "--endpoint-url", "http://127.0.0.1:1", *tiny_overrides(run_dir, tmp_path)]
    assert main(argv) == 2  # overrides after an option are overrides too
    assert error_lines(capsys) == [
        f"pixelflow: error: {tmp_path}/manifest.json: no manifest; is this a dataset written by pixelflow-data?"
    ]
    assert not run_dir.exists()


def test_internal_errors_print_the_traceback_and_say_it_is_a_bug(capsys):
    parser = argparse.ArgumentParser(prog="pixelflow")
    parser.set_defaults(func=lambda args: [][1])
    assert run_command(parser, [], (ConfigError,)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "IndexError" in err
    assert err.strip().splitlines()[-1] == (
        "pixelflow: internal error: this is a bug in pixelflow: please report it with the traceback above"
    )


def test_more_classes_in_the_data_than_the_model_has_is_one_line(tmp_path, shapes_dataset):
    with pytest.raises(ConfigError, match=r"^model.num_classes = 4 but the dataset .* has 16 classes$"):
        train(tiny_config(tmp_path / "run", shapes_dataset, "model.num_classes=4"))
    assert not (tmp_path / "run").exists()


def test_a_label_outside_the_model_classes_is_one_line_naming_the_sample(tmp_path, shapes_dataset):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_dataset, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.pop("num_classes")  # a dataset that does not say how many classes it has
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"^sample \S+: label \d+ outside 0..3 \(model.num_classes\)$"):
        train(tiny_config(tmp_path / "run", data, "model.num_classes=4"))


@pytest.mark.parametrize(
    "options, message",
    [
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--steps", "-3"], "--steps -3: must be at least 1"),
        (["--per-class", "0"], "--per-class 0: must be at least 1"),
        (["--cfg", "nan"], "--cfg nan: must be a finite number >= 0"),
        (["--cfg", "-1"], "--cfg -1.0: must be a finite number >= 0"),
        (["--out", "grid.gif"], "--out grid.gif: must end in .png, .jpg or .jpeg"),
        (["--out", "FILE/x.png"], "--out FILE/x.png: cannot be written there"),
        (["--device", "cuda"], "device cuda was asked for but no CUDA device is visible"),
    ],
)
def test_sample_options_are_checked_before_any_work(tmp_path, capsys, options, message):
    if options[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid here")
    (tmp_path / "FILE").write_text("a file, not a folder")
    options = [option.replace("FILE", str(tmp_path / "FILE")) for option in options]
    message = message.replace("FILE", str(tmp_path / "FILE"))
    argv = ["sample", "--checkpoint", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "grid.png"), *options]
    started = time.perf_counter()
    assert main(argv) == 2
    assert error_lines(capsys) == [f"pixelflow: error: {message}"]  # not the missing checkpoint: checked first
    assert time.perf_counter() - started < 5


def test_an_out_path_that_is_a_directory_is_refused(tmp_path, capsys):
    (tmp_path / "dir.png").mkdir()
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "dir.png")]) == 2
    assert error_lines(capsys)[-1] == f"pixelflow: error: --out {tmp_path / 'dir.png'}: is a directory"


@pytest.mark.slow
def test_an_unreachable_store_fails_in_one_line_after_the_configured_retries(tmp_path):
    port = free_port()  # nothing listens there
    overrides = tiny_overrides(tmp_path / "run", "s3://bucket/data", "data.retries=2", "data.retry_wait=0")
    command = ["pixelflow", "train", "configs/demo.yaml", *overrides]
    command += ["--endpoint-url", f"http://127.0.0.1:{port}"]
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    done = cli(*command, env=env, timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pixelflow: error: bucket/data/manifest.json: failed after 2 attempts: ")
    assert "Traceback" not in done.stderr


def test_missing_credentials_fail_at_once_without_retries(tmp_path, s3_endpoint):
    overrides = tiny_overrides(tmp_path / "run", "s3://pixelflow-test/none", "data.retries=5", "data.retry_wait=5")
    command = ["pixelflow", "train", "configs/demo.yaml", *overrides]
    command += ["--endpoint-url", s3_endpoint.endpoint]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        HOME=str(tmp_path), AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none")
    )
    started = time.perf_counter()
    done = cli(*command, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("pixelflow: error: pixelflow-test/none/manifest.json: access refused: NoCredentialsError")
    )
    assert "retrying" not in done.stderr and time.perf_counter() - started < 60


def test_values_from_the_environment_are_never_written_resolved_nor_printed(
    tmp_path, shapes_dataset, monkeypatch, capsys
):
    monkeypatch.setenv("PIXELFLOW_TEST_DATA", str(shapes_dataset))
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, "${oc.env:PIXELFLOW_TEST_DATA}", "train.steps=1", "checkpoint.every=1")
    assert main(["train", "configs/demo.yaml", *overrides]) == 0
    written = [run_dir / "config.yaml", run_dir / "checkpoints" / "step_00000001" / "config.yaml"]
    for path in written:
        text = path.read_text()
        assert "path: ${oc.env:PIXELFLOW_TEST_DATA}" in text and str(shapes_dataset) not in text
    monkeypatch.delenv("PIXELFLOW_TEST_DATA")  # sampling needs the model, not the data
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "g.png"), "--steps", "1"]) == 0

    monkeypatch.setenv("PIXELFLOW_TEST_DATA", str(shapes_dataset))
    monkeypatch.setenv("PIXELFLOW_TEST_SECRET", "hunter2-not-a-number")
    capsys.readouterr()
    assert main(["train", "configs/demo.yaml", *overrides, "data.resolution=${oc.env:PIXELFLOW_TEST_SECRET}"]) == 2
    [line] = error_lines(capsys)
    assert "hunter2" not in line and "'data.resolution'" in line


def test_an_error_during_the_run_blanks_out_values_from_the_environment_and_only_that_configs(
    tmp_path, monkeypatch, capsys
):
    hidden = tmp_path / "hunter2-dataset"
    monkeypatch.setenv("PIXELFLOW_TEST_DATA", str(hidden))
    overrides = tiny_overrides(tmp_path / "run", "${oc.env:PIXELFLOW_TEST_DATA}", "train.steps=1")
    assert main(["train", "configs/demo.yaml", *overrides]) == 2
    [line] = error_lines(capsys)
    assert "***" in line and "hunter2" not in line, line
    # the next command's config reads nothing from the environment: nothing of the first is blanked in it
    assert main(["train", "configs/demo.yaml", *tiny_overrides(tmp_path / "run2", str(hidden), "train.steps=1")]) == 2
    [line] = error_lines(capsys)
    assert str(hidden) in line, line


def test_a_password_in_the_endpoint_url_is_redacted_wherever_written_or_printed(tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, "s3://bucket/data", "data.retries=1")
    command = ["pixelflow", "train", "configs/demo.yaml", *overrides]
    command += ["data.endpoint_url=http://alice:s3cr3tpass@127.0.0.1:1"]
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    done = cli(*command, env=env, timeout=300)
    assert done.returncode == 2 and "s3cr3tpass" not in done.stdout + done.stderr
    from pixelflow.config import to_yaml

    cfg = load_config(REPO / "configs" / "demo.yaml", [*overrides, "data.endpoint_url=http://alice:s3cr3tpass@h:9"])
    assert "endpoint_url: http://***@h:9" in to_yaml(cfg) and "s3cr3tpass" not in to_yaml(cfg)


def edit_json(path, change) -> None:
    raw = json.loads(path.read_text())
    raw = change(raw) or raw
    path.write_text(json.dumps(raw))


def index(data):
    return data / "shard-000000.index.json"


DAMAGE = {
    "negative offset": (
        lambda d: edit_json(index(d), lambda r: r["samples"][0].update(offset=-512)),
        r"shard-000000.index.json: entry '\S+' has a negative offset",
    ),
    "length past the end": (
        lambda d: edit_json(index(d), lambda r: r["samples"][-1].update(length=10**9)),
        r"shard-000000.index.json: entry '\S+' runs past the shard's end",
    ),
    "overlapping entries": (
        lambda d: edit_json(index(d), lambda r: r["samples"][1].update(offset=r["samples"][0]["offset"])),
        r"shard-000000.index.json: entry '\S+' overlaps the one before it or is empty",
    ),
    "member of another key": (
        lambda d: edit_json(index(d), lambda r: r["samples"][0].update(key=r["samples"][1]["key"] + "x")),
        r"shard-000000.tar: the member at entry '\S+' belongs to another key",
    ),
    "manifest count differs": (
        lambda d: edit_json(d / "manifest.json", lambda r: r["shards"][0].update(count=31)),
        r"shard-000000.tar: the manifest says 31 samples, its index lists 32",
    ),
    "manifest not an object": (
        lambda d: (d / "manifest.json").write_text("[1, 2]"),
        r"manifest.json: not a pixelflow-shards manifest \(a JSON list\)",
    ),
    "missing tar": (
        lambda d: (d / "shard-000000.tar").unlink(),
        r"shard-000000.tar: shard missing",
    ),
    "shard outside the dataset": (
        lambda d: edit_json(d / "manifest.json", lambda r: r["shards"][0].update(name="../../etc/x.tar")),
        r"manifest.json: shard entry '../../etc/x.tar' is not a shard of this dataset",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_datasets_stop_with_one_line_naming_the_file_and_entry(tmp_path, damage):
    data = tmp_path / "data"
    write_synthetic_dataset(str(data), count=64, per_shard=32, size=40, seed=1)
    change, message = DAMAGE[damage]
    change(data)
    overrides = tiny_overrides(tmp_path / "run", data, "data.shuffle_block=64", "train.global_batch=16", "data.lanes=1")
    with pytest.raises(ShardFormatError) as error:
        train(load_config(REPO / "configs" / "demo.yaml", overrides))
    assert "\n" not in str(error.value)
    assert re.search(message, str(error.value)), str(error.value)
    assert committed_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_a_damaged_shard_read_by_a_data_worker_is_still_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_dataset(str(data), count=64, per_shard=32, size=40, seed=1)
    DAMAGE["overlapping entries"][0](data)
    overrides = tiny_overrides(tmp_path / "run", data, "data.num_workers=1", "data.lanes=1", "data.shuffle_block=64")
    assert main(["train", "configs/demo.yaml", *overrides]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"pixelflow: error: {data}/shard-000000.index.json: entry ") and "overlaps" in line


def bomb_png(side: int) -> bytes:
    """A valid greyscale PNG of side x side black pixels: a few hundred KB that decode to side^2 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, rows, parts = zlib.compressobj(9), bytes(side + 1) * 500, []
    for first in range(0, side, 500):
        parts.append(compressor.compress(rows[: (side + 1) * min(500, side - first)]))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_an_image_claiming_too_many_pixels_is_refused_from_its_header(tmp_path):
    from data_tools.ingest import Options, Skip, prepare_image

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(13000))
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(Skip, match="too_many_pixels"):  # ingest
        prepare_image(bomb.read_bytes(), Options())
    probe = (  # the loader's decode in a fresh process, whose peak memory says whether it decoded
        "import resource, sys; from pixelflow.data.decode import DecodeError, decode_rgb\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    decode_rgb(open(sys.argv[1], 'rb').read(), 256)\nexcept DecodeError as e:\n    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(bomb)], capture_output=True, text=True, cwd=REPO)
    message, grown_kib = done.stdout.splitlines()
    assert message == "13000 x 13000 pixels, more than data.max_pixels = 50000000"
    assert int(grown_kib) < 50_000  # decoding it would take 169 MB at one byte per pixel, 507 MB as RGB


def test_a_dataset_that_does_not_decode_stops_in_one_line_instead_of_warning_forever(tmp_path):
    import tarfile

    data = tmp_path / "data"
    write_synthetic_dataset(str(data), count=192, per_shard=32, size=40, seed=1)
    for shard in data.glob("*.tar"):  # every image's bytes zeroed in place: offsets stay, nothing decodes
        with tarfile.open(shard) as tar:
            spans = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".jpg")]
        with open(shard, "r+b") as handle:
            for offset, size in spans:
                handle.seek(offset)
                handle.write(b"\0" * size)
    started = time.perf_counter()
    with pytest.raises(ShardFormatError) as error:
        train(load_config(REPO / "configs" / "demo.yaml", tiny_overrides(tmp_path / "run", data)))
    assert re.fullmatch(
        rf"{data}: 100 of the last 100 samples could not be decoded, more than data.max_bad_fraction = 0.2 "
        r"\(the last: \S+: .+\)",
        str(error.value),
    ), str(error.value)
    assert time.perf_counter() - started < 60


def ingest_quietly(source, output, **options):
    from data_tools.ingest import Options, ingest

    create_bucket = options.pop("create_bucket", False)
    endpoint_url = options.pop("endpoint_url", None)
    return ingest(
        source,
        str(output),
        options=Options(min_size=16, **options),
        progress=False,
        create_bucket=create_bucket,
        endpoint_url=endpoint_url,
    )


def shard_bytes(output) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(output.glob("*.tar")))


def test_inputs_outside_the_root_are_refused_unless_allowed(tmp_path):
    from tests.test_s3_data import photo, save

    outside = tmp_path / "outside.jpg"
    save(outside, photo(1))
    folder = tmp_path / "folder"
    save(folder / "a.jpg", photo(2))
    (folder / "a.txt").write_text("a caption")
    (folder / "link.jpg").symlink_to(outside)
    (folder / "link.txt").write_text("the linked image")
    save(folder / "b.jpg", photo(3))
    (folder / "b.txt").symlink_to("/etc/passwd")
    report = ingest_quietly(folder, tmp_path / "out")
    assert (report.inputs, report.written, report.skipped) == (3, 1, {"outside_root": 2})
    assert b"root:" not in shard_bytes(tmp_path / "out")

    table = tmp_path / "table" / "rows.jsonl"
    save(tmp_path / "table" / "in.jpg", photo(4))
    rows = [{"image": "in.jpg", "caption": "c"}, {"image": str(outside), "caption": "c"}]
    rows.append({"image": "../outside.jpg", "caption": "c"})
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = ingest_quietly(table, tmp_path / "table-out")
    assert (report.written, report.skipped) == (1, {"outside_root": 2})
    allowed = ingest_quietly(table, tmp_path / "allowed", allow_outside_root=True)
    assert (allowed.written, allowed.skipped) == (3, {})


def test_fifos_devices_and_folders_named_like_images_are_skipped_without_reading(tmp_path):
    from tests.test_s3_data import photo, save

    folder = tmp_path / "folder" / "cls"
    save(folder / "good.jpg", photo(1))
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would wait forever
    (folder / "folder.jpg").mkdir()
    (folder / "zero.jpg").symlink_to("/dev/zero")  # reading it never ends
    save(folder / "big.jpg", photo(2, size=(300, 300)))
    command = ["data_tools", "ingest", str(tmp_path / "folder"), str(tmp_path / "out")]
    command += ["--min-size", "16", "--max-file-mb", "0.01", "--allow-outside-root", "--quiet"]
    done = cli(*command, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["written"] == 1 and report["skipped"] == {"not_a_file": 3, "too_large_file": 1}
    assert report["written"] + sum(report["skipped"].values()) == report["inputs"] == 5


def test_broken_table_rows_are_skipped_by_reason(tmp_path):
    from tests.test_s3_data import photo, save

    save(tmp_path / "t" / "ok.jpg", photo(1))
    lines = [
        json.dumps({"image": "ok.jpg", "caption": "fine"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"image": None, "caption": "no path"}),
        json.dumps({"image": "", "caption": "empty path"}),
        '{"image": "ok.jpg", "caption": "lone \\ud800 surrogate"}',
    ]
    (tmp_path / "t" / "rows.jsonl").write_text("\n".join(lines) + "\n")
    report = ingest_quietly(tmp_path / "t" / "rows.jsonl", tmp_path / "out")
    assert report.written == 1
    assert report.skipped == {"bad_row": 1, "empty_path": 2, "bad_caption": 1}
    assert report.inputs == 5


def test_names_that_sanitise_alike_keep_distinct_keys(tmp_path):
    from pixelflow.data.shard_format import read_index
    from pixelflow.data.storage import filesystem
    from tests.test_s3_data import photo, save

    for i, name in enumerate(["a b", "a_b", "a-b"]):
        save(tmp_path / "in" / f"{name}.jpg", photo(i))
        (tmp_path / "in" / f"{name}.txt").write_text(f"caption {i}")
    report = ingest_quietly(tmp_path / "in", tmp_path / "out")
    assert (report.written, report.skipped) == (3, {})
    fs, root = filesystem(str(tmp_path / "out"))
    keys = [e.key for e in read_index(fs, root, "shard-000000.tar")]
    assert len(set(keys)) == 3


def test_a_rerun_with_other_inputs_or_options_redoes_the_shards(tmp_path):
    from tests.test_s3_data import photo, save

    for i in range(4):
        save(tmp_path / "in" / "c" / f"{i}.jpg", photo(i))
    first = ingest_quietly(tmp_path / "in", tmp_path / "out", per_shard=2)
    same = ingest_quietly(tmp_path / "in", tmp_path / "out", per_shard=2)
    assert (first.shards_reused, same.shards_reused) == (0, 2)
    other = ingest_quietly(tmp_path / "in", tmp_path / "out", per_shard=2, reencode=True, quality=50)
    assert other.shards_reused == 0 and other.converted == {"reencoded": 4}
    save(tmp_path / "in" / "c" / "3.jpg", photo(99, size=(64, 50)))  # one input changed
    changed = ingest_quietly(tmp_path / "in", tmp_path / "out", per_shard=2, reencode=True, quality=50)
    assert changed.shards_reused == 1


def test_ingest_into_a_missing_bucket_is_an_error_unless_asked_to_create_it(tmp_path, s3_endpoint):
    from data_tools.ingest import IngestError
    from tests.test_s3_data import photo, save

    save(tmp_path / "in" / "c" / "0.jpg", photo(0))
    with pytest.raises(IngestError, match=r"^s3://no-such-bucket/x: bucket no-such-bucket does not exist"):
        ingest_quietly(tmp_path / "in", "s3://no-such-bucket/x", endpoint_url=s3_endpoint.endpoint)
    made = ingest_quietly(
        tmp_path / "in", "s3://no-such-bucket/x", endpoint_url=s3_endpoint.endpoint, create_bucket=True
    )
    assert made.written == 1


def test_a_torn_last_metrics_line_is_dropped_and_damage_elsewhere_is_one_line(tmp_path, shapes_dataset, caplog):
    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3")).run_dir
    metrics = run_dir / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"step": 4, "loss": 0.1')  # a kill or a full disk in the middle of an append
    train(tiny_config(run_dir, shapes_dataset))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert any("dropping its torn last line 4" in r.getMessage() for r in caplog.records)
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20]
    metrics.write_text("\n".join(lines) + "\n")
    before = metrics.read_text()
    with pytest.raises(ConfigError, match=rf"^{metrics}:2: not a JSON record \(damaged: mend or delete that line\)$"):
        train(tiny_config(run_dir, shapes_dataset, "train.steps=7"))
    assert metrics.read_text() == before


def test_report_tells_runs_of_one_name_apart_skips_a_torn_line_and_says_when_there_is_nothing(tmp_path, shapes_dataset):
    first = train(tiny_config(tmp_path / "a" / "run", shapes_dataset, "train.steps=2")).run_dir
    second = train(tiny_config(tmp_path / "b" / "run", shapes_dataset, "train.steps=2")).run_dir
    with open(second / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "lo')
    done = cli("pixelflow", "report", first, second, "--out", tmp_path / "plots")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == "runs: a/run, b/run"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    nothing = cli("pixelflow", "report", empty, "--out", tmp_path / "nothing")
    assert nothing.returncode == 2
    assert errors_in(nothing.stderr) == [
        f"pixelflow: error: {empty}: no logged losses in metrics.jsonl: nothing to plot"
    ]
    assert not (tmp_path / "nothing").exists()


@pytest.mark.slow
def test_an_export_never_shadows_checkpoints_and_replaces_an_export_only_when_forced(tmp_path, shapes_dataset):
    from pixelflow.weights import EXPORT_WEIGHTS

    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=3")).run_dir
    step = run_dir / "checkpoints" / "step_00000003"
    (tmp_path / "file").write_text("a file")
    hides = "a run directory or checkpoint folder: an export there would hide its checkpoints; export into a folder"
    for destination, message in [
        (run_dir, f"{hides} of its own"),
        (step, f"{hides} of its own"),
        (run_dir / "checkpoints", f"{hides} of its own"),
        (tmp_path / "file", "a file, not a folder to export into"),
    ]:
        done = cli("pixelflow", "export", run_dir, destination)
        assert done.returncode == 2 and errors_in(done.stderr) == [f"pixelflow: error: {destination}: {message}"]
    assert not (run_dir / EXPORT_WEIGHTS).exists() and not (step / EXPORT_WEIGHTS).exists()
    assert cli("pixelflow", "export", run_dir, tmp_path / "export").returncode == 0
    again = cli("pixelflow", "export", run_dir, tmp_path / "export", "--weights", "model")
    assert again.returncode == 2
    assert errors_in(again.stderr) == [
        f"pixelflow: error: {tmp_path / 'export'}: already holds an export; --force replaces it"
    ]
    forced = cli("pixelflow", "export", run_dir, tmp_path / "export", "--weights", "model", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]


def test_tracebacks_the_readme_promises_as_one_line(tmp_path, shapes_dataset, capsys):
    """Each of these used to print a traceback."""
    from safetensors.torch import load_file, save_file

    from pixelflow.weights import export

    run_dir = train(tiny_config(tmp_path / "run", shapes_dataset, "train.steps=1", "checkpoint.every=1")).run_dir
    out = ["--out", str(tmp_path / "grid.png"), "--steps", "1"]
    no_config = export(run_dir, tmp_path / "no-config")
    (no_config / "config.yaml").unlink()
    misshapen = export(run_dir, tmp_path / "misshapen")
    weights = load_file(misshapen / "model.safetensors")
    weights["final.proj.weight"] = weights["final.proj.weight"][:, :3].contiguous()
    save_file(weights, misshapen / "model.safetensors")
    encoder = tmp_path / "t5-no-weights"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    (encoder / "tokenizer.json").write_text("{}")
    tar = shapes_dataset / "shard-000000.tar"
    cases = [
        (["sample", "--checkpoint", str(no_config), *out], f"{no_config}: no config.yaml beside model.safetensors"),
        (["sample", "--checkpoint", str(misshapen), *out], f"{misshapen}: tensor 'model/final.proj.weight' is "),
        (
            ["train", "configs/demo.yaml", *tiny_overrides(tmp_path / "ft", shapes_dataset, f"resume={misshapen}")],
            f"{misshapen}: tensor 'model/final.proj.weight' is ",
        ),
        (
            ["train", "configs/demo_t2i.yaml", f"run_dir={tmp_path / 't2i'}", f"data.path={shapes_dataset}"]
            + [f"text.encoder={encoder}"],
            f"text.encoder: {encoder}: no weights (model.safetensors or pytorch_model.bin, or their index)",
        ),
        (
            ["train", "configs/demo.yaml", *tiny_overrides(tmp_path / "tar", tar)],
            f"{tar}: a file, not a dataset: give the folder that holds manifest.json and the shards",
        ),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        [line] = error_lines(capsys)
        assert line.startswith(f"pixelflow: error: {message}"), line
    assert not (tmp_path / "ft").exists() and not (tmp_path / "tar").exists() and not (tmp_path / "t2i").exists()


def test_a_prompt_file_that_is_not_a_regular_file_says_so(tmp_path):
    import argparse

    from pixelflow.cli import read_prompts

    with pytest.raises(ConfigError, match=r"^--prompt-file /dev/null: not a regular file"):
        read_prompts(argparse.Namespace(prompt=None, prompt_file="/dev/null"))
    with pytest.raises(ConfigError, match=rf"^--prompt-file {tmp_path}/none: not found$"):
        read_prompts(argparse.Namespace(prompt=None, prompt_file=str(tmp_path / "none")))


def test_a_reader_that_closes_the_pipe_ends_a_command_quietly(tmp_path, shapes_dataset):
    from tests.test_s3_data import photo, save

    for i in range(3):
        save(tmp_path / "in" / "c" / f"{i}.jpg", photo(i))
    ingest = f"{sys.executable} -m data_tools ingest {tmp_path / 'in'} {tmp_path / 'out'} --min-size 16 --quiet"
    command = ["bash", "-c", f'{ingest} | true; echo "status ${{PIPESTATUS[0]}}" >&2']  # `true` reads nothing
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "bug" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == "status 141"  # 128 + SIGPIPE, as the shell's own tools end
    assert (tmp_path / "out" / "manifest.json").is_file()  # the work was done; only the report had no reader


def test_a_run_diverging_between_log_lines_stops_at_the_next_one_naming_the_first_bad_step(tmp_path, shapes_dataset):
    """The finiteness check waits on the device only where the loop syncs anyway (log, grid, save): the
    run stops there, naming the step that diverged, with no non-finite line logged and nothing saved."""
    overrides = ["train.lr=1e30", "train.warmup_steps=0", "train.log_every=4", "checkpoint.every=4"]
    with pytest.raises(NonFiniteError, match=r"^step 2: the loss or gradient is not finite \(grad norm nan\)"):
        train(tiny_config(tmp_path / "run", shapes_dataset, *overrides))
    assert committed_checkpoints(tmp_path / "run" / "checkpoints") == []
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and math.isfinite(records[0]["loss"])
