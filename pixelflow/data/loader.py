"""Deterministic, resumable streaming of training crops from shards on local disk or S3.

The dataset is read through a fixed number of *lanes*. Every epoch a seeded permutation deals the shards
to the lanes round-robin; a lane reads its shards in order, in blocks of `shuffle_block` samples that it
shuffles with a seeded permutation. A lane's sample sequence is therefore a pure function of
(seed, lane, number of lanes), and its only state is how many samples were consumed: a checkpoint stores one
integer per lane and a restart continues exactly, re-reading at most one block.

The global batch of a step is defined by the lanes alone: its slot j takes the next decodable sample of
lane ((step - 1) x batch + j) mod lanes (a mixture of datasets shares the batch out among them first, each
with its own lanes: data/mixture.py). Lanes are dealt to data ranks and then to DataLoader workers, each
of which reads the slots its lanes serve, so the batch's content and order are the same on any layout and
any worker count (the trainer then moves each sample to the rank the planner gives it). Lanes run on into
the next epoch, and a restart on a different number of ranks deals the same lanes out again from their
cursors.

Each block is fetched with one ranged read per shard it touches, retried with backoff on transient
storage errors, while the block before it is being decoded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pixelflow.config import DataConfig, SourceConfig
from pixelflow.data import text_store
from pixelflow.data.decode import DecodeError, decode_crop
from pixelflow.data.mixture import Mixture, check_mixable, saved_sources, schedule
from pixelflow.data.shard_format import Manifest, SampleEntry, parse_sample, read_index, read_manifest
from pixelflow.data.storage import filesystem, with_retries
from pixelflow.data.storage import storage_options as storage_options_for
from pixelflow.errors import ConfigError, ShardFormatError, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T", int, np.ndarray)


def lane_shards(num_shards: int, num_lanes: int, lane: int, seed: int, epoch: int) -> list[int]:
    """Shards a lane reads in an epoch, in reading order."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)
    return order[lane::num_lanes].tolist()


@dataclass(frozen=True)
class ReadSettings:
    """Everything a reading process needs; picklable, so DataLoader workers get it whole."""

    data: DataConfig  # the path (of this source), crop, shuffling, retries and decoding
    manifest: Manifest
    num_lanes: int
    seed: int
    storage_options: dict = field(default_factory=dict)
    text: str = ""  # what travels with each image: "" nothing | captions | embeddings (precomputed)
    embeddings: str = ""  # where the precomputed embeddings are (text = embeddings)
    text_dim: int = 0  # the width of the precomputed embeddings, which every shard's must match


@dataclass(frozen=True)
class Sample:
    position: int  # index in the lane's endless sequence
    key: str
    label: int  # -1 when the sample has none
    image: np.ndarray | None  # (3, R, R) uint8; None when the image could not be decoded
    problem: str = ""  # why not
    payload: bytes = b""  # the caption (utf-8) or its float16 embedding, when text travels


@dataclass(frozen=True)
class Fetched:
    """One sample of a lane as read, before decoding (which its step's crop size decides)."""

    position: int  # index in the lane's endless sequence
    epoch: int
    entry: SampleEntry
    members: dict[str, bytes]
    payload: bytes


@dataclass(frozen=True)
class Block:
    epoch: int
    start: int  # position in the epoch of the block's first sample
    entries: list[tuple[int, int]]  # (shard, index in shard) in file order
    order: np.ndarray  # the block's seeded permutation
    skip: int  # samples of the permuted block already consumed


class LaneReader:
    """Reads one lane's endless, block-shuffled sample sequence from any position."""

    def __init__(self, settings: ReadSettings, lane: int):
        self.settings, self.lane = settings, lane
        self._fs, self._base, self._fs_pid = None, "", -1
        self._tars: tuple[fsspec.AbstractFileSystem, str] | None = None
        self._index = lru_cache(maxsize=64)(self._load_index)
        self._embedding_index = lru_cache(maxsize=64)(self._load_embedding_index)

    def _filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, dataset path in it), made afresh in each process: s3fs instances are not fork-safe."""
        if self._fs_pid != os.getpid():
            self._fs, self._base = filesystem(self.settings.data.path, **self.settings.storage_options)
            self._tars = self._tar_filesystem()
            self._fs_pid = os.getpid()
        assert self._fs is not None
        return self._fs, self._base

    def _tar_filesystem(self) -> tuple[fsspec.AbstractFileSystem, str] | None:
        """(filesystem, folder) of adopted tars that live elsewhere than the dataset (manifest `location`)."""
        location = self.settings.manifest.location
        if not location:
            return None

        def protocol(path: str) -> str:
            return path.split("://")[0] if "://" in path else "file"

        same_kind = protocol(location) == protocol(self.settings.data.path)
        options = (
            self.settings.storage_options
            if same_kind
            else storage_options_for(location, self.settings.data.endpoint_url)
        )
        return filesystem(location, **options)

    def _load_index(self, shard: int) -> list[SampleEntry]:
        fs, base = self._filesystem()
        settings, info = self.settings, self.settings.manifest.shards[shard]
        entries = read_index(fs, base, info.name, settings.data.retries, settings.data.retry_wait)
        if len(entries) != info.count:
            raise ShardFormatError(
                f"{base}/{info.name}: the manifest says {info.count} samples, its index lists {len(entries)}"
            )
        return entries

    def _load_embedding_index(self, shard: int) -> dict:
        fs, _ = self._filesystem()
        name = self.settings.manifest.shards[shard].name.removesuffix(".tar")
        index = text_store.read_index(
            fs, self.settings.embeddings, name, self.settings.data.retries, self.settings.data.retry_wait
        )
        if index is None or len(index["entries"]) != self.settings.manifest.shards[shard].count:
            raise ShardFormatError(
                f"{self.settings.embeddings}: no complete caption embeddings for {name} (run `pixelflow-data "
                f"encode-text` again: it finishes what is missing)"
            )
        if index.get("dim") != self.settings.text_dim:
            raise ShardFormatError(
                f"{self.settings.embeddings}/{name}{text_store.SUFFIX}.json: {index.get('dim')}-wide embeddings, the "
                f"model takes model.text_dim = {self.settings.text_dim} (another encoder? run `pixelflow-data "
                f"encode-text` again with the run's encoder)"
            )
        return index

    def _payloads(self, shard: int, first: int, stop: int, entries: list[SampleEntry]) -> list[bytes]:
        """The text that travels with samples [first, stop) of a shard."""
        if self.settings.text != "embeddings":
            return [b""] * (stop - first)
        fs, _ = self._filesystem()
        index = self._embedding_index(shard)
        name = self.settings.manifest.shards[shard].name.removesuffix(".tar")
        arrays = text_store.read_entries(
            fs,
            self.settings.embeddings,
            name,
            index,
            first,
            stop,
            self.settings.data.retries,
            self.settings.data.retry_wait,
        )
        for (key, _, _), entry in zip(index["entries"][first:stop], entries):
            if key != entry.key:
                raise ShardFormatError(
                    f"{self.settings.embeddings}/{name}: embeddings belong to other samples ({key} for "
                    f"{entry.key}); run `pixelflow-data encode-text` again"
                )
        return [array.tobytes() for array in arrays]

    def _epoch_entries(self, epoch: int) -> list[tuple[int, int]]:
        shards = self.settings.manifest.shards
        chosen = lane_shards(len(shards), self.settings.num_lanes, self.lane, self.settings.seed, epoch)
        return [(shard, i) for shard in chosen for i in range(shards[shard].count)]

    def _blocks(self, position: int) -> Iterator[Block]:
        """The lane's blocks from the one holding `position` on, forever."""
        epoch, offset = 0, position
        while offset >= len(entries := self._epoch_entries(epoch)):
            if not entries:
                raise ShardFormatError(f"{self.settings.data.path}: lane {self.lane} was dealt only empty shards")
            offset -= len(entries)
            epoch += 1
        size = self.settings.data.shuffle_block
        while True:
            entries = self._epoch_entries(epoch)
            for start in range(offset - offset % size, len(entries), size):
                block = entries[start : start + size]
                order = np.random.default_rng([self.settings.seed, epoch, self.lane, start]).permutation(len(block))
                yield Block(epoch, start, block, order, max(0, offset - start))
            offset = 0
            epoch += 1

    def _fetch(self, block: Block) -> list[tuple[SampleEntry, dict[str, bytes], bytes]]:
        """The block's samples (in file order) with one retried ranged read per shard they come from."""
        fs, base = self._filesystem()
        if self._tars is not None:  # adopted tars elsewhere: the indexes stay beside the manifest
            fs, base = self._tars
        out, first = [], 0
        entries = block.entries
        while first < len(entries):
            shard = entries[first][0]
            stop = first
            while stop < len(entries) and entries[stop][0] == shard:
                stop += 1
            index = self._index(shard)
            head, tail = index[entries[first][1]], index[entries[stop - 1][1]]
            path = f"{base}/{self.settings.manifest.shards[shard].name}"
            try:
                raw = with_retries(
                    lambda path=path, head=head, tail=tail: fs.cat_file(
                        path, start=head.offset, end=tail.offset + tail.length
                    ),
                    f"reading shard {path}",
                    self.settings.data.retries,
                    self.settings.data.retry_wait,
                )
            except FileNotFoundError:
                raise ShardFormatError(f"{path}: shard missing (its index and the manifest name it)") from None
            if len(raw) != tail.offset + tail.length - head.offset:
                raise ShardFormatError(f"{path}: shorter than its index says (truncated?)")
            first_index = entries[first][1]
            payloads = self._payloads(
                shard, first_index, entries[stop - 1][1] + 1, [index[i] for _, i in entries[first:stop]]
            )
            for (_, i), payload in zip(entries[first:stop], payloads):
                entry = index[i]
                chunk = raw[entry.offset - head.offset : entry.offset - head.offset + entry.length]
                members = parse_sample(chunk, f"{path} sample {entry.key}")  # pyright: ignore[reportArgumentType] (cat_file of a byte range returns bytes)
                if members.get("__key__") != entry.key.encode():
                    raise ShardFormatError(f"{path}: the member at entry {entry.key!r} belongs to another key")
                if self.settings.text == "captions":
                    payload = caption_bytes(members, self.settings.manifest.caption_field)
                out.append((entry, members, payload))
            first = stop
        return out

    def fetched(self, position: int) -> Iterator[Fetched]:
        """The lane's samples from `position` on, forever, undecoded; the next block downloads while this one
        is consumed."""
        blocks = self._blocks(position)
        with ThreadPoolExecutor(max_workers=1) as prefetcher:
            block = next(blocks)
            pending = prefetcher.submit(self._fetch, block)
            while True:
                upcoming = next(blocks)
                fetched, pending = pending.result(), prefetcher.submit(self._fetch, upcoming)
                for j in block.order[block.skip :]:
                    yield Fetched(position, block.epoch, *fetched[j])
                    position += 1
                block = upcoming

    def samples(self, position: int) -> Iterator[Sample]:
        """The lane's samples from `position` on, forever, cropped to data.resolution."""
        return (self.decode(item, self.settings.data.resolution) for item in self.fetched(position))

    def decode(self, item: Fetched, resolution: int) -> Sample:
        """A fetched sample's random crop of `resolution` (its randomness keyed by seed, epoch, position, lane)."""
        entry, members, payload, position = item.entry, item.members, item.payload, item.position
        label = -1 if entry.label is None else int(entry.label)
        rng = np.random.default_rng([self.settings.seed, item.epoch, position, self.lane])
        try:
            image = decode_crop(
                members[entry.image],
                resolution,
                rng,
                max_pixels=self.settings.data.max_pixels,
                expand_ratio=self.settings.data.expand_ratio,
                resize_filter=self.settings.data.resize_filter,
            )
        except (DecodeError, KeyError) as exc:
            log.warning("skipping sample %s (lane %d): cannot decode image: %s", entry.key, self.lane, exc)
            return Sample(position, entry.key, label, None, str(exc))
        return Sample(position, entry.key, label, image, payload=payload)


@dataclass
class ReadShare:
    """The samples of one step's global batch that this rank read: `slots` (ascending) are their indices in
    the global batch."""

    step: int
    slots: np.ndarray  # (n,) int64
    images: torch.Tensor  # (n, 3, R, R) uint8
    labels: torch.Tensor  # (n,) int64, -1 = unlabelled
    keys: list[str]
    positions: dict[int, int]  # lane -> samples consumed once this share is used
    payloads: list[bytes] = field(default_factory=list)  # per sample: caption or embedding, when text travels
    batch_lanes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (B,) every slot's lane
    batch_sources: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (B,) and its source


def caption_bytes(members: dict[str, bytes], field: str | None) -> bytes:
    """A sample's caption: its .txt member, or `field` of its .json (adopted tars; missing: empty)."""
    if field is None:
        return members.get("txt", b"")
    try:
        value = json.loads(members.get("json", b"{}")).get(field)
    except (ValueError, AttributeError):
        value = None
    return str(value).encode() if value is not None else b""


def lane_reader(lane: T, readers: int) -> T:
    """The data rank that reads a lane, or each of an array of lanes (lanes are dealt round-robin)."""
    return lane % readers


def _stack(images: list[np.ndarray], resolution: int) -> torch.Tensor:
    if not images:
        return torch.zeros((0, 3, resolution, resolution), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images))


class BadShare:
    """Stops a stream whose recent samples mostly fail to decode (a wrong or damaged dataset), instead of
    skipping and warning forever: more than max_bad_fraction of the last WINDOW samples (after MINIMUM)."""

    WINDOW, MINIMUM = 500, 100

    def __init__(self, settings: ReadSettings):
        self.settings, self.outcomes = settings, deque(maxlen=self.WINDOW)

    def add(self, sample: Sample) -> None:
        self.outcomes.append(sample.image is None)
        bad = sum(self.outcomes)
        if len(self.outcomes) >= self.MINIMUM and bad > self.settings.data.max_bad_fraction * len(self.outcomes):
            raise ShardFormatError(
                f"{self.settings.data.path}: {bad} of the last {len(self.outcomes)} samples could not be decoded, more "
                f"than data.max_bad_fraction = {self.settings.data.max_bad_fraction} (the last: {sample.key}: "
                f"{sample.problem or 'decoded'})"
            )


class ShardStream(IterableDataset):
    """Per step, the samples of one rank's lanes in the global batch; each DataLoader worker serves a fixed
    subset of the lanes and yields one share per step (possibly empty), so the loader's round-robin over
    workers lines up with steps."""

    def __init__(
        self,
        sources: list[ReadSettings],
        mixture: Mixture,
        lanes: list[int],
        positions: dict[int, int],
        taken: np.ndarray,
        first_step: int,
    ):
        super().__init__()
        self.sources, self.mixture, self.lanes, self.positions = sources, mixture, lanes, positions
        self.taken, self.first_step = taken, first_step

    def __iter__(self) -> Iterator[ReadShare]:
        worker = get_worker_info()
        lanes = self.lanes if worker is None else self.lanes[worker.id :: worker.num_workers]
        readers, pending = {}, {}
        for lane in lanes:
            source, own_lane = self.mixture.source_of(lane)
            readers[lane] = LaneReader(self.sources[source], own_lane)
            pending[lane] = readers[lane].fetched(self.positions[lane])
        positions = {lane: self.positions[lane] for lane in lanes}
        recent = [BadShare(settings) for settings in self.sources]
        data = self.sources[0].data
        for step_slots in schedule(self.mixture, self.first_step, self.taken):
            serving, resolution = step_slots.lanes, data.resolution_at(step_slots.step)
            slots = np.flatnonzero(np.isin(serving, lanes))
            images, labels, keys, payloads = [], [], [], []
            for slot in slots:
                lane = int(serving[slot])
                while True:  # the lane's next decodable sample
                    sample = readers[lane].decode(next(pending[lane]), resolution)
                    positions[lane] = sample.position + 1
                    recent[step_slots.sources[slot]].add(sample)
                    if sample.image is not None:
                        break
                images.append(sample.image)
                labels.append(sample.label)
                keys.append(sample.key)
                payloads.append(sample.payload)
            yield ReadShare(
                step_slots.step,
                slots,
                _stack(images, resolution),
                torch.tensor(labels, dtype=torch.int64),
                keys,
                dict(positions),
                payloads,
            )


DEFAULT_LANES = 16  # when data.lanes is 0 (at most one per shard): the same on every layout


def open_dataset(
    path: str,
    storage_options: dict,
    retries: int,
    retry_wait: float,
    num_classes: int,
    lanes: int,
    state: dict | None,
) -> tuple[Manifest, int]:
    """(the manifest, the number of reading lanes) of a dataset that a run can read: one clear error when it
    has more classes than the model or too few shards for the lanes (`state`: a checkpoint's, whose lanes
    are fixed for the run's life)."""
    fs, root = filesystem(path, **storage_options)
    manifest = read_manifest(fs, root, retries, retry_wait)
    if num_classes and (manifest.num_classes or 0) > num_classes:
        raise ConfigError(
            f"model.num_classes = {num_classes} but the dataset {path} has {manifest.num_classes} classes"
        )
    num_lanes = state["num_lanes"] if state else (lanes or min(DEFAULT_LANES, len(manifest.shards)))
    if len(manifest.shards) < num_lanes:
        raise ShardFormatError(
            f"{path}: {len(manifest.shards)} shards cannot feed {num_lanes} reading lanes (data.lanes); "
            f"write more, smaller shards or use fewer lanes"
        )
    return manifest, num_lanes


@dataclass(frozen=True)
class OpenSource:
    """One source of a run's data, opened: its manifest, lanes and, on resume, its saved reading state."""

    source: SourceConfig
    manifest: Manifest
    num_lanes: int
    storage_options: dict
    saved: dict | None


def open_sources(
    data: DataConfig,
    *,
    num_classes: int,
    state: dict | None,
    storage_options: dict | None = None,
    quiet: bool = True,
) -> list[OpenSource]:
    """Every source of the run's data (data.path, or each of data.sources) opened with `open_dataset`, and
    checked to mix. `state`: a checkpoint's data state; `storage_options`: for every source (default: each
    path's own); `quiet=False` says which sources a resume adds or drops."""
    sources = data.datasets()
    opened = []
    for source, saved in zip(sources, saved_sources(sources, state, quiet=quiet)):
        options = (
            storage_options if storage_options is not None else storage_options_for(source.path, data.endpoint_url)
        )
        manifest, lanes = open_dataset(
            source.path, options, data.retries, data.retry_wait, num_classes, data.lanes, saved
        )
        opened.append(OpenSource(source, manifest, lanes, options, saved))
    check_mixable(sources, [one.manifest for one in opened])
    return opened


class DataStream:
    """One data rank's share of every step's global batch, plus the lane cursors a checkpoint needs.

    The global batch of a step is fixed by (seed, step, sources and their lanes) alone (data/mixture.py);
    this rank reads the slots served by its lanes (the sources' lanes, numbered one after another, are dealt
    to the data ranks round-robin, then to DataLoader workers). `state` is a previous `state_dict()` (merged
    over ranks); lanes then keep their count and cursors, whatever the number of ranks now. `first_step` is
    the step the first share is for. `embeddings`: text.embeddings (one dataset's precomputed embeddings).
    """

    def __init__(
        self,
        data: DataConfig,
        *,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        storage_options: dict | None = None,
        pin_memory: bool = False,
        ignore_signals: tuple[int, ...] = (),
        num_classes: int = 0,
        first_step: int = 1,
        text: str = "",
        embeddings: str | None = None,
        text_dim: int = 0,
    ):
        self.sources = open_sources(
            data, num_classes=num_classes, state=state, storage_options=storage_options, quiet=rank != 0
        )
        self.num_classes = num_classes  # labels must lie in 0..num_classes-1 (0: unchecked)
        self.mixture = Mixture(
            global_batch,
            tuple(one.source.weight for one in self.sources),
            tuple(one.num_lanes for one in self.sources),
            seed,
        )
        num_lanes = self.mixture.total_lanes
        if num_lanes < world_size and rank == 0:
            log.warning(
                "%d reading lanes for %d data ranks: %d ranks read nothing and get their samples from the "
                "others (start a run with data.lanes >= the data ranks to spread the reading)",
                num_lanes,
                world_size,
                world_size - num_lanes,
            )
        self.data = data
        self.lanes = list(range(rank, num_lanes, world_size))
        saved = [p for one in self.sources for p in (one.saved["positions"] if one.saved else [0] * one.num_lanes)]
        self.positions = {lane: int(saved[lane]) for lane in self.lanes}
        self.taken = np.array([taken_before(one.saved, first_step, global_batch) for one in self.sources])
        self._slots = schedule(self.mixture, first_step, self.taken)
        num_workers = data.num_workers
        self.workers = max(min(num_workers, len(self.lanes)), 1) if self.lanes else 0
        settings = [
            ReadSettings(
                dataclasses.replace(data, path=one.source.path, sources=[]),
                one.manifest,
                one.num_lanes,
                seed,
                one.storage_options,
                text,
                text_store.embeddings_location(one.source.embeddings or embeddings, one.source.path),
                text_dim,
            )
            for one in self.sources
        ]
        self._iterator = None
        if self.lanes:
            stream = ShardStream(settings, self.mixture, self.lanes, dict(self.positions), self.taken, first_step)
            self._loader = DataLoader(
                stream,
                batch_size=None,
                num_workers=min(num_workers, len(self.lanes)),
                pin_memory=pin_memory,
                worker_init_fn=functools.partial(_quiet_worker, ignore_signals),
                prefetch_factor=2 if num_workers else None,
            )
            self._iterator = iter(self._loader)

    def __iter__(self) -> Iterator[ReadShare]:
        return self

    def _next_piece(self) -> ReadShare:
        try:
            assert self._iterator is not None  # only ranks with lanes read
            return next(self._iterator)
        except (ShardFormatError, StorageError, ConfigError) as exc:  # from a worker: its message, one line
            raise type(exc)(str(exc).strip().splitlines()[-1].split(f"{type(exc).__name__}: ", 1)[-1]) from None

    def __next__(self) -> ReadShare:
        """This rank's samples of the next step's global batch (every worker's piece of it, by slot)."""
        step_slots = next(self._slots)
        pieces = [self._next_piece() for _ in range(self.workers)]
        step = step_slots.step
        assert all(piece.step == step for piece in pieces), "DataLoader workers out of step"
        slots = np.concatenate([p.slots for p in pieces]) if pieces else np.zeros(0, dtype=np.int64)
        order = np.argsort(slots, kind="stable")
        images = torch.cat([p.images for p in pieces]) if pieces else _stack([], self.data.resolution_at(step))
        labels = torch.cat([p.labels for p in pieces]) if pieces else torch.zeros(0, dtype=torch.int64)
        keys = [key for p in pieces for key in p.keys]
        payloads = [payload for p in pieces for payload in p.payloads]
        index = torch.from_numpy(order)
        share = ReadShare(
            step,
            slots[order],
            images[index],
            labels[index],
            [keys[i] for i in order],
            {},
            [payloads[i] for i in order],
            step_slots.lanes,
            step_slots.sources,
        )
        if self.num_classes:
            bad = ((share.labels >= self.num_classes) | (share.labels < -1)).nonzero().flatten().tolist()
            if bad:
                raise ShardFormatError(
                    f"sample {share.keys[bad[0]]}: label {int(share.labels[bad[0]])} outside "
                    f"0..{self.num_classes - 1} (model.num_classes)"
                )
        for piece in pieces:
            self.positions.update(piece.positions)
        self.taken = step_slots.taken
        return share

    def close(self) -> None:
        """Stop the DataLoader workers now rather than at garbage collection."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict:
        """Per source: its name, lanes, the cursors of this rank's lanes (others 0: merge ranks' states with
        `merge_states`) and the samples it has given."""
        first = self.mixture.first_lanes
        return {
            "sources": [
                {
                    "name": one.source.label,
                    "num_lanes": one.num_lanes,
                    "positions": [self.positions.get(int(first[k]) + lane, 0) for lane in range(one.num_lanes)],
                    "taken": int(self.taken[k]),
                }
                for k, one in enumerate(self.sources)
            ]
        }


def taken_before(saved: dict | None, first_step: int, global_batch: int) -> int:
    """Samples a source gave the steps before `first_step`: saved, or all of them for a state written before
    mixtures (one source), or none for a source the run has not read."""
    if saved is None:
        return 0
    return saved["taken"] if saved.get("taken") is not None else (first_step - 1) * global_batch


def merge_states(states: list[dict]) -> dict:
    """One data state from every rank's: each lane's cursor comes from the rank that owned it."""
    merged = []
    for entries in zip(*(state["sources"] for state in states)):
        positions = [max(column) for column in zip(*(entry["positions"] for entry in entries))]
        merged.append({**entries[0], "positions": positions})
    return {"sources": merged}


def _quiet_worker(ignore_signals: tuple[int, ...], _: int) -> None:
    """One thread per worker; the trainer's stop signals are the trainer's business (a worker killed by
    one would crash its rank)."""
    torch.set_num_threads(1)
    for number in ignore_signals:
        signal.signal(number, signal.SIG_IGN)
