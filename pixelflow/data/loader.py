"""Deterministic, resumable streaming of training crops from shards on local disk or S3.

The dataset is read through a fixed number of *lanes*. Every epoch a seeded permutation deals the shards
to the lanes round-robin; a lane reads its shards in order, in blocks of `shuffle_block` samples that it
shuffles with a seeded permutation. A lane's sample sequence is therefore a pure function of
(seed, lane, number of lanes), and its only state is how many samples were consumed: a checkpoint stores one
integer per lane and a restart continues exactly, re-reading at most one block. Lanes are dealt to ranks
and then to DataLoader workers; a worker always takes its next sample from its least-advanced lane, so
the interleaving is deterministic too. Lanes run on into the next epoch, so no rank ever runs dry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pixelflow.data.decode import DecodeError, decode_crop
from pixelflow.data.shard_format import (
    Manifest,
    SampleEntry,
    ShardFormatError,
    filesystem,
    parse_sample,
    read_index,
    read_manifest,
)

log = logging.getLogger(__name__)


def lane_shards(num_shards: int, num_lanes: int, lane: int, seed: int, epoch: int) -> list[int]:
    """Shards a lane reads in an epoch, in reading order."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)
    return order[lane::num_lanes].tolist()


@dataclass(frozen=True)
class Sample:
    lane: int
    position: int  # index in the lane's endless sequence
    key: str
    label: int  # -1 when the sample has none
    image: np.ndarray | None  # (3, R, R) uint8; None when the image could not be decoded


class LaneReader:
    """Reads one lane's endless, block-shuffled sample sequence from any position."""

    def __init__(
        self,
        root: str,
        storage_options: dict,
        manifest: Manifest,
        lane: int,
        num_lanes: int,
        seed: int,
        resolution: int,
        shuffle_block: int,
    ):
        self.root, self.storage_options, self.manifest = root, storage_options, manifest
        self.lane, self.num_lanes, self.seed = lane, num_lanes, seed
        self.resolution, self.block = resolution, shuffle_block
        self._fs, self._base, self._fs_pid = None, "", -1
        self._index = lru_cache(maxsize=64)(self._load_index)

    def _filesystem(self):
        """(filesystem, dataset path in it), made afresh in each process: s3fs instances are not fork-safe."""
        if self._fs_pid != os.getpid():
            self._fs, self._base = filesystem(self.root, **self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs, self._base

    def _load_index(self, shard: int) -> list[SampleEntry]:
        fs, base = self._filesystem()
        return read_index(fs, base, self.manifest.shards[shard].name)

    def _epoch_entries(self, epoch: int) -> list[tuple[int, int]]:
        shards = lane_shards(len(self.manifest.shards), self.num_lanes, self.lane, self.seed, epoch)
        return [(shard, i) for shard in shards for i in range(self.manifest.shards[shard].count)]

    def _read_block(self, entries: list[tuple[int, int]]) -> list[tuple[SampleEntry, dict[str, bytes]]]:
        """Fetch a block's samples with one ranged read per shard they come from."""
        out = []
        start = 0
        while start < len(entries):
            shard = entries[start][0]
            stop = start
            while stop < len(entries) and entries[stop][0] == shard:
                stop += 1
            index = self._index(shard)
            first, last = index[entries[start][1]], index[entries[stop - 1][1]]
            fs, base = self._filesystem()
            path = f"{base}/{self.manifest.shards[shard].name}"
            raw = fs.cat_file(path, start=first.offset, end=last.offset + last.length)
            for _, i in entries[start:stop]:
                entry = index[i]
                where = f"{path} sample {entry.key}"
                chunk = raw[entry.offset - first.offset : entry.offset - first.offset + entry.length]
                out.append((entry, parse_sample(chunk, where)))
            start = stop
        return out

    def samples(self, position: int) -> Iterator[Sample]:
        """The lane's samples from `position` on, forever."""
        epoch, offset = 0, position
        while True:
            entries = self._epoch_entries(epoch)
            if offset < len(entries):
                break
            if not entries:
                raise ShardFormatError(f"{self.root}: lane {self.lane} got no shards; need more shards than lanes")
            offset -= len(entries)
            epoch += 1
        while True:
            entries = self._epoch_entries(epoch)
            for block_start in range(offset - offset % self.block, len(entries), self.block):
                block = entries[block_start : block_start + self.block]
                order = np.random.default_rng([self.seed, epoch, self.lane, block_start]).permutation(len(block))
                remaining = order[max(0, offset - block_start) :]
                wanted = sorted(remaining)  # file order, so each shard is one ranged read
                fetched = dict(zip(wanted, self._read_block([block[j] for j in wanted])))
                for j in remaining:
                    entry, members = fetched[j]
                    yield self._decode(entry, members, epoch, position)
                    position += 1
            offset = 0
            epoch += 1

    def _decode(self, entry: SampleEntry, members: dict[str, bytes], epoch: int, position: int) -> Sample:
        label = -1 if entry.label is None else int(entry.label)
        rng = np.random.default_rng([self.seed, epoch, position, self.lane])
        try:
            image = decode_crop(members[entry.image], self.resolution, rng)
        except (DecodeError, KeyError) as exc:
            log.warning("skipping sample %s (lane %d): cannot decode image: %s", entry.key, self.lane, exc)
            image = None
        return Sample(self.lane, position, entry.key, label, image)


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, R, R) uint8
    labels: torch.Tensor  # (B,) int64, -1 = unlabelled
    keys: list[str]
    positions: dict[int, int]  # lane -> samples consumed once this batch is used


class ShardStream(IterableDataset):
    """Batches of one rank's lanes; each DataLoader worker serves a fixed subset of them."""

    def __init__(
        self,
        root: str,
        manifest: Manifest,
        lanes: list[int],
        num_lanes: int,
        positions: dict[int, int],
        batch_size: int,
        resolution: int,
        seed: int,
        shuffle_block: int,
        storage_options: dict | None = None,
        first_worker: int = 0,
    ):
        super().__init__()
        self.root, self.manifest, self.lanes, self.num_lanes = root, manifest, lanes, num_lanes
        self.first_worker = first_worker
        self.positions, self.batch_size, self.resolution = positions, batch_size, resolution
        self.seed, self.shuffle_block, self.storage_options = seed, shuffle_block, storage_options or {}

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        if worker is None:
            lanes = self.lanes
        else:  # the DataLoader asks worker 0 first; rotate so the worker whose turn it was goes first
            lanes = self.lanes[(worker.id + self.first_worker) % worker.num_workers :: worker.num_workers]
        if not lanes:
            return
        readers = {
            lane: LaneReader(
                self.root,
                self.storage_options,
                self.manifest,
                lane,
                self.num_lanes,
                self.seed,
                self.resolution,
                self.shuffle_block,
            ).samples(self.positions[lane])
            for lane in lanes
        }
        positions = {lane: self.positions[lane] for lane in lanes}
        while True:
            images, labels, keys = [], [], []
            while len(images) < self.batch_size:
                lane = min(lanes, key=lambda name: (positions[name], name))
                sample = next(readers[lane])
                positions[lane] = sample.position + 1
                if sample.image is not None:
                    images.append(sample.image)
                    labels.append(sample.label)
                    keys.append(sample.key)
            yield Batch(torch.from_numpy(np.stack(images)), torch.tensor(labels), keys, dict(positions))


class DataStream:
    """One rank's endless iterator of batches plus the lane cursors a checkpoint needs to resume it."""

    def __init__(
        self,
        path: str,
        batch_size: int,
        resolution: int,
        seed: int,
        num_workers: int,
        shuffle_block: int,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        storage_options: dict | None = None,
        pin_memory: bool = False,
    ):
        fs, root = filesystem(path, **(storage_options or {}))
        self.manifest = read_manifest(fs, root)
        num_lanes = state["num_lanes"] if state else world_size * max(num_workers, 1)
        if num_lanes % world_size:
            raise ValueError(f"checkpointed data has {num_lanes} lanes, which {world_size} ranks cannot share evenly")
        if len(self.manifest.shards) < num_lanes:
            raise ShardFormatError(
                f"{path}: {len(self.manifest.shards)} shards cannot feed {num_lanes} reading lanes "
                f"(ranks x data workers); write more, smaller shards or use fewer workers"
            )
        self.num_lanes = num_lanes
        self.lanes = list(range(rank, num_lanes, world_size))
        saved = state["positions"] if state else [0] * num_lanes
        self.positions = {lane: int(saved[lane]) for lane in self.lanes}
        self.batches = int(state["batches"]) if state else 0
        workers = min(num_workers, len(self.lanes))
        stream = ShardStream(
            path,
            self.manifest,
            self.lanes,
            num_lanes,
            dict(self.positions),
            batch_size,
            resolution,
            seed,
            shuffle_block,
            storage_options,
            self.batches % max(workers, 1),
        )
        self._loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=pin_memory,
            worker_init_fn=_quiet_worker,
            prefetch_factor=2 if workers else None,
        )
        self._iterator = iter(self._loader)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        self.positions.update(batch.positions)
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        """Cursors of this rank's lanes (others stay 0; ranks' states merge by taking the maximum) and the
        number of batches taken, which fixes whose turn it is among the DataLoader workers."""
        positions = [0] * self.num_lanes
        for lane, position in self.positions.items():
            positions[lane] = position
        return {"num_lanes": self.num_lanes, "positions": positions, "batches": self.batches}


def _quiet_worker(_: int) -> None:
    torch.set_num_threads(1)
