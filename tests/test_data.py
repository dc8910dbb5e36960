"""Shards and the streaming loader: format round trip, exactly-once lanes, determinism, resume, bad images."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pixelflow.config import DataConfig
from pixelflow.data.decode import DecodeError, decode_crop
from pixelflow.data.loader import DataStream, LaneReader, ReadSettings, lane_shards
from pixelflow.data.shard_format import (
    Manifest,
    ShardWriter,
    check_key,
    parse_sample,
    read_index,
    read_manifest,
    shard_name,
    write_json_atomically,
)
from pixelflow.data.storage import filesystem
from pixelflow.errors import ShardFormatError
from tests.conftest import cli


def all_keys(root) -> list[str]:
    fs, base = filesystem(str(root))
    manifest = read_manifest(fs, base)
    return [e.key for s in manifest.shards for e in read_index(fs, base, s.name)]


def test_manifest_and_index_describe_the_tars(shapes_dataset):
    fs, base = filesystem(str(shapes_dataset))
    manifest = read_manifest(fs, base)
    assert (manifest.num_samples, len(manifest.shards), manifest.num_classes) == (192, 6, 16)
    shard = manifest.shards[2]
    raw = (shapes_dataset / shard.name).read_bytes()
    assert len(raw) == shard.bytes
    for entry in read_index(fs, base, shard.name):
        members = parse_sample(raw[entry.offset : entry.offset + entry.length], shard.name)
        assert members["__key__"].decode() == entry.key
        assert json.loads(members["json"])["label"] == entry.label
        assert Image.open(io.BytesIO(members[entry.image])).size == (entry.width, entry.height)
        assert members["txt"].startswith(b"a ")


@pytest.mark.parametrize("key", ["../evil", "/abs", "a/b", ".hidden", "x y", ""])
def test_keys_that_could_escape_or_confuse_tar_are_rejected(key):
    with pytest.raises(ShardFormatError):
        check_key(key)


def test_missing_or_foreign_manifest_is_a_clear_error(tmp_path):
    fs, base = filesystem(str(tmp_path))
    with pytest.raises(ShardFormatError, match="no manifest"):
        read_manifest(fs, base)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ShardFormatError, match="not a pixelflow-shards manifest"):
        read_manifest(fs, base)


def lane_epochs(root, lane: int, num_lanes: int, epochs: int) -> list[list[str]]:
    """The keys a lane yields in each of its first epochs."""
    fs, base = filesystem(str(root))
    manifest = read_manifest(fs, base)
    settings = ReadSettings(DataConfig(path=str(root), resolution=32, shuffle_block=10), manifest, num_lanes, seed=5)
    stream = LaneReader(settings, lane).samples(0)
    out = []
    for epoch in range(epochs):
        length = sum(manifest.shards[s].count for s in lane_shards(len(manifest.shards), num_lanes, lane, 5, epoch))
        out.append([next(stream).key for _ in range(length)])
    return out


def test_every_sample_exactly_once_per_epoch_across_lanes(shapes_dataset):
    expected = Counter(all_keys(shapes_dataset))
    epochs = [lane_epochs(shapes_dataset, lane, 4, 2) for lane in range(4)]
    for epoch in range(2):
        seen = Counter(key for lane in epochs for key in lane[epoch])
        assert seen == expected
    assert epochs[0][0] != epochs[0][1]  # reshuffled between epochs


def data_section(root, **values) -> DataConfig:
    """A data section reading `root` in 32-pixel crops, in the main process unless `values` say otherwise."""
    return DataConfig(**{"path": str(root), "resolution": 32, "num_workers": 0, "shuffle_block": 16, **values})


def take(stream: DataStream, count: int):
    return [next(stream) for _ in range(count)]


def global_batches(root, ranks: int, workers: int, steps: int) -> list[dict[int, tuple[str, bytes]]]:
    """Per step, slot -> (key, image bytes) of the global batch that `ranks` data ranks read together."""
    streams = [
        DataStream(data_section(root, num_workers=workers), global_batch=8, seed=3, rank=rank, world_size=ranks)
        for rank in range(ranks)
    ]
    out = []
    for _ in range(steps):
        merged = {}
        for stream in streams:
            share = next(stream)
            for slot, key, image in zip(share.slots.tolist(), share.keys, share.images):
                assert slot not in merged  # no slot is read twice
                merged[slot] = (key, image.numpy().tobytes())
        out.append(merged)
    for stream in streams:
        stream.close()
    return out


def test_the_global_batch_is_the_same_on_any_number_of_ranks_and_workers(shapes_dataset):
    reference = global_batches(shapes_dataset, 1, 0, 6)
    assert all(sorted(batch) == list(range(8)) for batch in reference)
    keys = [key for batch in reference for key, _ in batch.values()]
    assert len(set(keys)) == len(keys) == 48
    for ranks, workers in [(2, 2), (4, 1), (3, 0), (8, 1)]:  # 8 ranks > 6 lanes: two read nothing
        assert global_batches(shapes_dataset, ranks, workers, 6) == reference, (ranks, workers)
    first = next(DataStream(data_section(shapes_dataset), global_batch=8, seed=3))
    assert first.images.dtype == torch.uint8 and first.images.shape == (8, 3, 32, 32) and first.step == 1


def test_resume_from_lane_cursors_continues_exactly(shapes_dataset):
    def stream(state=None, first_step=1):
        return DataStream(
            data_section(shapes_dataset, num_workers=2), global_batch=8, seed=3, state=state, first_step=first_step
        )

    uninterrupted = stream()
    reference = take(uninterrupted, 9)
    first = stream()
    take(first, 5)
    state = first.state_dict()
    resumed = take(stream(state, 6), 4)
    assert [b.keys for b in resumed] == [b.keys for b in reference[5:]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, reference[5:]))


def test_too_few_shards_for_the_lanes_is_a_clear_error(shapes_dataset):
    with pytest.raises(ShardFormatError, match="6 shards cannot feed 8 reading lanes"):
        DataStream(data_section(shapes_dataset, num_workers=4, lanes=8), global_batch=8, seed=0)


def jpeg(colour, size=40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_corrupt_image_is_skipped_and_the_batch_stays_full(tmp_path, caplog):
    fs, base = filesystem(str(tmp_path))
    shards = []
    for number in range(2):
        writer = ShardWriter(fs, base, shard_name(number))
        for i in range(6):
            data = b"\xff\xd8 not really a jpeg" if (number, i) == (1, 2) else jpeg((10 * i, 0, 0))
            writer.add(f"s{number}-{i}", data, "jpg", "c", {"label": i, "width": 40, "height": 40})
        shards.append(writer.close())
    write_json_atomically(fs, f"{base}/manifest.json", Manifest(shards).to_json())
    stream = DataStream(data_section(tmp_path, shuffle_block=4), global_batch=4, seed=0)
    with caplog.at_level(logging.WARNING):
        keys = [k for b in take(stream, 4) for k in b.keys]
    assert "s1-2" not in keys and len(keys) == 16
    assert any("skipping sample s1-2" in r.message for r in caplog.records)


def test_decode_resizes_crops_and_rejects_garbage():
    rng = np.random.default_rng(0)
    wide = Image.new("RGB", (90, 45), (200, 10, 10))
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    crop = decode_crop(buffer.getvalue(), 32, rng)
    assert crop.shape == (3, 32, 32) and crop.dtype == np.uint8
    assert abs(int(crop[0].mean()) - 200) <= 2
    with pytest.raises(DecodeError):
        decode_crop(b"garbage", 32, rng)


def test_expand_ratio_resizes_past_the_crop_and_both_filters_agree():
    """The reference's recipe: shorter side to 1.125 x the crop (LANCZOS), then a random square crop."""
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 64, dtype=np.float32)
    pixels = np.stack([np.add.outer(gradient, gradient) / 2] * 3, -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    crops = {
        decode_crop(data, 32, np.random.default_rng(seed), flip=False, expand_ratio=1.125)[0, 0, 0]
        for seed in range(20)
    }
    assert len(crops) > 1  # the 36-pixel resize leaves room for the crop to move
    assert {
        decode_crop(data, 32, np.random.default_rng(s), flip=False, expand_ratio=1.0)[0, 0, 0] for s in range(20)
    } == {
        decode_crop(data, 32, rng, flip=False, expand_ratio=1.0)[0, 0, 0]
    }  # ratio 1: the crop is the whole resized image
    bicubic = decode_crop(data, 32, np.random.default_rng(1), expand_ratio=1.125).astype(int)
    lanczos = decode_crop(data, 32, np.random.default_rng(1), expand_ratio=1.125, resize_filter="lanczos")
    assert lanczos.shape == (3, 32, 32) and np.abs(bicubic - lanczos).mean() < 2.0


def test_synth_writes_shapes_in_the_aspects_asked_for(tmp_path):
    out = tmp_path / "aspects"
    done = cli("data_tools", "synth", out, "--count", 6, "--per-shard", 6, "--size", 40, "--aspects", 1, 2, 0.5)
    assert done.returncode == 0, done.stderr
    fs, root = filesystem(str(out))
    [shard] = read_manifest(fs, root).shards
    entries = read_index(fs, root, shard.name)
    sizes = [(entry.width, entry.height) for entry in entries]
    assert sizes == [(40, 40), (57, 28), (28, 57)] * 2  # about 40 x 40 pixels each, width / height in turn
    members = parse_sample(
        fs.cat_file(f"{root}/{shard.name}", start=entries[1].offset, end=entries[1].offset + entries[1].length), "wide"
    )
    assert Image.open(io.BytesIO(members["jpg"])).size == (57, 28)
    bad = cli("data_tools", "synth", tmp_path / "bad", "--aspects", "0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "pixelflow-data synth: error: argument --aspects: '0' is not a positive number"
    )
