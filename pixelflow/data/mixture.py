"""Mixtures of datasets (`data.sources`): which source and lane serve each slot of a step's global batch.

Every step takes exact shares of the global batch from the sources (the floor or the ceiling of batch x
weight; the remainder goes to sources drawn with the step's seed, as the planner shares stages), in config
order: slots 0..n_0-1 from the first source, and so on. Each source is read through its own lanes, as one
dataset is: its samples are numbered from the run's start (`taken` counts them) and its n-th sample is the
next decodable one of its lane n mod lanes. The lanes of all sources are numbered one after another
(global lanes) and dealt to data ranks and workers like the lanes of one dataset, so the reading and the
exchange do not know about mixtures. A step's content is a function of (seed, step, sources) alone.

One dataset is the mixture of one source: its slot j of step s is its sample (s - 1) x batch + j.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pixelflow.config import SourceConfig
from pixelflow.data.planner import exact_shares
from pixelflow.data.shard_format import Manifest
from pixelflow.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mixture:
    batch: int  # samples in the global batch
    weights: tuple[float, ...]  # of each source
    lanes: tuple[int, ...]  # reading lanes of each source
    seed: int

    @property
    def first_lanes(self) -> np.ndarray:
        """The global number of each source's lane 0."""
        return np.cumsum((0, *self.lanes[:-1])).astype(np.int64)

    @property
    def total_lanes(self) -> int:
        return sum(self.lanes)

    def source_of(self, lane: int) -> tuple[int, int]:
        """(source, its own lane number) of a global lane."""
        source = int(np.searchsorted(self.first_lanes, lane, side="right")) - 1
        return source, lane - int(self.first_lanes[source])

    def counts(self, step: int) -> np.ndarray:
        """Samples each source gives the step's global batch (one source: all of them, no draw)."""
        return exact_shares(self.batch, self.weights, [self.seed, step, 0x50C5E])


@dataclass(frozen=True)
class StepSlots:
    """Where each slot of one step's global batch comes from."""

    step: int
    lanes: np.ndarray  # (B,) the global lane that serves it
    sources: np.ndarray  # (B,) its source
    taken: np.ndarray  # (sources,) samples taken from each source once this step is read


def schedule(mixture: Mixture, first_step: int, taken: np.ndarray) -> Iterator[StepSlots]:
    """Every step's slots from `first_step` on; `taken`: the samples each source gave the steps before."""
    taken = np.asarray(taken, dtype=np.int64)
    lanes, first_lanes = np.asarray(mixture.lanes, dtype=np.int64), mixture.first_lanes
    step = first_step
    while True:
        counts = mixture.counts(step)
        sources = np.repeat(np.arange(len(counts)), counts)
        # slot j of source k's run of slots is its sample taken[k] + (j - the run's first slot)
        index = np.repeat(taken - (np.cumsum(counts) - counts), counts) + np.arange(mixture.batch)
        taken = taken + counts
        yield StepSlots(step, first_lanes[sources] + index % lanes[sources], sources, taken)
        step += 1


def saved_sources(sources: list[SourceConfig], state: dict | None, *, quiet: bool = True) -> list[dict | None]:
    """Each source's reading state in a checkpoint's data state (None: it starts at its beginning). One
    source takes the one saved whatever its name (a dataset that moved); in a mixture they match by name
    (`SourceConfig.label`), so sources can be added or dropped on resume (said unless `quiet`). A state
    written before mixtures is one source's, without `taken`."""
    if state is None:
        return [None] * len(sources)
    saved = state.get("sources") or [{**state, "name": None, "taken": None}]
    if len(saved) == 1 and len(sources) == 1:
        return [saved[0]]
    by_name = {entry["name"]: entry for entry in saved}
    matched = [by_name.get(source.label) for source in sources]
    if not quiet:
        for source, entry in zip(sources, matched):
            if entry is None:
                log.warning("data.sources: %s is new to this run: read from its beginning", source.label)
        for name in sorted(set(by_name) - {source.label for source in sources}, key=str):
            log.warning("data.sources: %s was read before and is no longer in the mixture", name)
    return matched


def check_mixable(sources: list[SourceConfig], manifests: list[Manifest]) -> None:
    """Class sources (labels) and text sources (captions) do not mix: a model trains on one kind."""
    classes = [manifest.num_classes or 0 for manifest in manifests]
    if any(classes) and not all(classes):
        labelled, other = sources[next(i for i, c in enumerate(classes) if c)], sources[classes.index(0)]
        raise ConfigError(
            f"data.sources: {labelled.path} has class labels but {other.path} has none (a text dataset): class "
            f"and text sources do not mix in one run"
        )
