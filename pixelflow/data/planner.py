"""The step plan: the cascade stage of every sample of a global batch, the data-parallel unit that trains
it and its micro-batch.

A sample's cost depends on its stage (at 256 px the top stage costs ~100x the bottom one), so dealing
equal sample counts to ranks leaves them several-fold apart in work when each holds one or two images.
The planner balances predicted cost instead:

1. Stage counts are exact shares of the batch (`weights`; a fractional remainder goes to stages drawn
   with the step's seed), and a seeded permutation says which sample gets which stage.
2. Samples are dealt to units longest-first, each to the least loaded unit (LPT). Samples of one kind
   (a stage, or a stage of one aspect bucket: `bucket_tokens`) cost the same, so a kind is dealt at once by
   water-filling over integer costs: exact LPT, fast at thousands of units.
3. Each unit's samples are packed into micro-batches of at most `unit_budget` tokens, and every unit runs
   the same number of them (FSDP's collectives and DeepSpeed's accumulation boundary need it): units that
   need fewer split theirs, and a unit with fewer samples than micro-batches runs padding ones.

An SP group is one unit (its ranks share each micro-batch, with sp x the token budget). The plan is a pure
function of (seed, step, settings), so a resume replans the same step identically, and a resume on another
layout plans the same global batch over the new units.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pixelflow.config import Config, micro_tokens

MEGA = 1_000_000  # costs are integers in millions of FLOPs: exact ties, no overflow at 1024 px x 16k samples


@dataclass(frozen=True)
class CostModel:
    """Predicted cost of training one sample of L tokens: depth x (24 d^2 L + 4 d L^2 + overhead d L), the
    forward FLOPs of the matmuls and attention (backward is a fixed multiple) plus `overhead` per token and
    channel (FLOP-equivalents) for what does not scale with d^2 or L^2: norms, modulation, elementwise,
    launches. The overhead is calibrated per hardware (benchmarks/planner.py --calibrate)."""

    depth: int
    dim: int
    overhead: float = 0.0

    def flops(self, tokens: int) -> float:
        return self.depth * (24 * self.dim**2 * tokens + 4 * self.dim * tokens**2 + self.overhead * self.dim * tokens)


@dataclass(frozen=True)
class PlanSettings:
    """What the model, resolution and layout fix for every step of a run."""

    batch: int  # samples in the global batch
    stage_tokens: tuple[int, ...]  # tokens of one sample at each stage, lowest stage first
    weights: tuple[float, ...]  # share of the batch per stage (normalised)
    units: int  # data-parallel units: data ranks, an SP group counting once
    unit_budget: int  # tokens per micro-batch of one unit (sp x the per-rank budget); 0 = no limit
    cost: CostModel
    seed: int = 0
    # aspect buckets: tokens of one sample of each bucket at each stage (bucket-major); () = one bucket whose
    # tokens are stage_tokens. A sample's kind is bucket x stages + stage.
    bucket_tokens: tuple[tuple[int, ...], ...] = ()

    @property
    def stages(self) -> int:
        return len(self.stage_tokens)

    def integer_costs(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Integer cost of one sample of each of these token counts (millions of FLOPs, at least 1)."""
        return np.array([max(1, math.ceil(self.cost.flops(int(t)) / MEGA)) for t in tokens], dtype=np.int64)

    @functools.cached_property
    def stage_costs(self) -> np.ndarray:
        """Integer cost of one sample per stage (the one-bucket kinds)."""
        return self.integer_costs(self.stage_tokens)

    @functools.cached_property
    def kind_tokens(self) -> np.ndarray:
        """Tokens of one sample of each kind (bucket x stages + stage)."""
        rows = self.bucket_tokens or (self.stage_tokens,)
        return np.array([tokens for row in rows for tokens in row], dtype=np.int64)

    @functools.cached_property
    def kind_costs(self) -> np.ndarray:
        """Integer cost of one sample of each kind."""
        return self.integer_costs(self.kind_tokens)

    def check(self) -> str | None:
        """Why these settings cannot be planned, or None."""
        if self.unit_budget and int(self.kind_tokens.max()) > self.unit_budget:
            return (
                f"a top-stage sample has {int(self.kind_tokens.max())} tokens, more than one micro-batch may hold "
                f"({self.unit_budget} tokens per data-parallel unit)"
            )
        if any(len(row) != self.stages for row in self.bucket_tokens):
            return f"every bucket needs tokens for each of the {self.stages} stages"
        if len(self.weights) != self.stages or min(self.weights) < 0 or sum(self.weights) <= 0:
            return f"stage weights {list(self.weights)} must be {self.stages} non-negative numbers, not all 0"
        return None


@dataclass(frozen=True)
class StepPlan:
    settings: PlanSettings
    stages: np.ndarray  # (B,) stage of every sample of the global batch
    units: np.ndarray  # (B,) the unit that trains it
    micro: np.ndarray  # (B,) its micro-batch within the unit
    num_micro: int  # micro-batches every unit runs
    unit_costs: np.ndarray  # (units,) predicted cost (millions of FLOPs)
    kinds: np.ndarray  # (B,) its kind: bucket x stages + stage (the stage, with one bucket)

    def micro_batches(self, unit: int) -> list[np.ndarray]:
        """A unit's micro-batches: sample indices, highest stage first then by index (may be empty: padding)."""
        mine = np.flatnonzero(self.units == unit)
        order = mine[np.lexsort((mine, -self.stages[mine], self.micro[mine]))]
        return [order[self.micro[order] == m] for m in range(self.num_micro)]

    def samples_of(self, unit: int) -> np.ndarray:
        """The unit's samples in the order it receives them: ascending index."""
        return np.flatnonzero(self.units == unit)

    def tokens(self) -> int:
        """Tokens of the whole global batch."""
        return int(self.settings.kind_tokens[self.kinds].sum())

    def training_flops(self) -> float:
        """FLOPs of the step's forward and backward over the global batch: 3 x depth x (24 d^2 L + 4 d L^2)
        per sample (the convention of MFU figures; the overhead term is not counted)."""
        cost, tokens = self.settings.cost, self.settings.kind_tokens
        counts = np.bincount(self.kinds, minlength=len(tokens))
        return float(sum(3 * CostModel(cost.depth, cost.dim).flops(int(t)) * n for t, n in zip(tokens, counts)))

    @property
    def max_over_mean(self) -> float:
        return float(self.unit_costs.max() / self.unit_costs.mean())

    @property
    def lower_bound(self) -> float:
        costs = self.settings.kind_costs
        return cost_lower_bound(costs, np.bincount(self.kinds, minlength=len(costs)), self.settings.units)


def exact_shares(total: int, weights: Sequence[float], key: list[int]) -> np.ndarray:
    """`total` split by `weights`: the floor of each share, the remainder to parts drawn by fractional part
    with the generator seeded by `key` (so every part gets the floor or the ceiling of its share)."""
    parts = np.asarray(weights, dtype=np.float64)
    quota = total * parts / parts.sum()
    counts = np.floor(quota + 1e-9).astype(np.int64)
    remainder = total - int(counts.sum())
    if remainder:
        fraction = np.clip(quota - counts, 0, None)
        rng = np.random.default_rng(key)
        chosen = rng.choice(len(parts), size=remainder, replace=False, p=fraction / fraction.sum())
        counts[chosen] += 1
    return counts


def stage_counts(settings: PlanSettings, step: int) -> np.ndarray:
    """Samples per stage: exact shares of the batch by the stage weights."""
    return exact_shares(settings.batch, settings.weights, [settings.seed, step, 0x5A4E])


def water_fill(loads: np.ndarray, cost: int, count: int) -> np.ndarray:
    """How many of `count` items of one cost each unit gets when every item in turn goes to the least loaded
    unit (lowest index on ties), without the loop: the items take the `count` smallest values
    load_u + j * cost, found by a binary search over the threshold."""
    if count == 0:
        return np.zeros_like(loads)

    def at_most(value: int) -> int:
        return int(np.maximum((value - loads) // cost + 1, 0).sum())

    per_unit = -(-count // len(loads))
    low, high = int(loads.min()), min(int(loads.min()) + count * cost, int(loads.max()) + per_unit * cost)
    while low < high:
        middle = (low + high) // 2
        if at_most(middle) >= count:
            high = middle
        else:
            low = middle + 1
    taken = np.maximum((low - 1 - loads) // cost + 1, 0)  # slots strictly below the threshold
    ties = np.flatnonzero((loads <= low) & ((low - loads) % cost == 0))
    taken[ties[: count - int(taken.sum())]] += 1
    return taken


def cost_lower_bound(stage_costs: np.ndarray, counts: np.ndarray, units: int) -> float:
    """No assignment beats this max/mean: among the k costliest kinds, some unit holds ceil(n_k / units)
    samples each costing at least c_k."""
    total = float((stage_costs * counts).sum())
    mean = total / units
    bound, held = mean, 0
    for stage in np.argsort(-stage_costs, kind="stable"):
        held += int(counts[stage])
        if held:
            bound = max(bound, math.ceil(held / units) * float(stage_costs[stage]))
    return bound / mean


@functools.lru_cache(maxsize=4096)
def pack(tokens: tuple[int, ...], budget: int, bins: int) -> tuple[int, ...]:
    """Micro-batch of each item (tokens sorted descending) for exactly `bins` micro-batches of <= budget
    tokens: worst-fit decreasing (balanced sizes); when that overflows, first-fit decreasing and then the
    fullest micro-batches halved. Fewer items than bins leaves some empty."""
    loads = [0] * bins
    chosen = []
    for size in tokens:
        target = min(range(bins), key=lambda b: (loads[b], b))
        loads[target] += size
        chosen.append(target)
    if not budget or max(loads) <= budget:
        return tuple(chosen)
    groups = first_fit(tokens, budget)
    while len(groups) < bins and any(len(g) > 1 for g in groups):
        widest = max(range(len(groups)), key=lambda g: (len(groups[g]), -g))
        group = groups.pop(widest)
        groups[widest:widest] = [group[0::2], group[1::2]]
    out = [0] * len(tokens)
    for index, group in enumerate(groups):
        for item in group:
            out[item] = index
    return tuple(out)


def first_fit(tokens: Sequence[int], budget: int) -> list[list[int]]:
    """Items (by position, tokens sorted descending) in first-fit micro-batches of <= budget tokens."""
    groups: list[list[int]] = []
    loads: list[int] = []
    for item, size in enumerate(tokens):
        for index, load in enumerate(loads):
            if load + size <= budget:
                groups[index].append(item)
                loads[index] += size
                break
        else:
            groups.append([item])
            loads.append(size)
    return groups


def plan_step(settings: PlanSettings, step: int, buckets: np.ndarray | None = None) -> StepPlan:
    """The plan of one step (deterministic in settings, step and `buckets`: the aspect bucket of every
    sample of the global batch, None with one bucket)."""
    counts = stage_counts(settings, step)
    stage_list = np.repeat(np.arange(settings.stages), counts)
    stages = np.random.default_rng([settings.seed, step, 0x57A6E]).permutation(stage_list)
    kinds = stages if buckets is None else np.asarray(buckets, dtype=np.int64) * settings.stages + stages
    costs, kind_tokens = settings.kind_costs, settings.kind_tokens
    kind_counts = np.bincount(kinds, minlength=len(costs))
    loads = np.zeros(settings.units, dtype=np.int64)
    per_unit = np.zeros((settings.units, len(costs)), dtype=np.int64)
    units = np.empty(settings.batch, dtype=np.int64)
    rank_in_unit = np.empty(settings.batch, dtype=np.int64)  # among the unit's samples of the same kind
    for kind in np.argsort(-costs, kind="stable"):
        taken = water_fill(loads, int(costs[kind]), int(kind_counts[kind]))
        loads += taken * costs[kind]
        per_unit[:, kind] = taken
        members = np.flatnonzero(kinds == kind)  # dealt by index to the units in order
        units[members] = owner = np.repeat(np.arange(settings.units), taken)
        rank_in_unit[members] = np.arange(len(members)) - (np.cumsum(taken) - taken)[owner]
    # micro-batches: units with the same kind counts pack alike, so pack each distinct composition once
    _, first, which = np.unique(per_unit, axis=0, return_index=True, return_inverse=True)
    compositions = per_unit[first]
    descending = np.argsort(-kind_tokens, kind="stable")

    def tokens_of(row: np.ndarray) -> tuple[int, ...]:
        return tuple(int(kind_tokens[k]) for k in descending for _ in range(int(row[k])))

    budget = settings.unit_budget
    needed = [len(first_fit(tokens_of(row), budget)) if budget else 1 for row in compositions]
    num_micro = max(needed)
    # template[c, offset[c, k] + r]: micro-batch of the r-th kind-k sample of a unit with composition c
    templates = np.zeros((len(compositions), int(per_unit.sum(1).max())), dtype=np.int64)
    offsets = np.zeros_like(compositions)
    for c, row in enumerate(compositions):
        packed = pack(tokens_of(row), budget, num_micro)
        templates[c, : len(packed)] = packed
        offsets[c, descending] = np.cumsum(row[descending]) - row[descending]
    composition = which.reshape(-1)[units]
    micro = templates[composition, offsets[composition, kinds] + rank_in_unit]
    return StepPlan(settings, stages, units, micro, num_micro, loads, kinds)


def stage_tokens(resolution: int, patch_size: int, stages: int, width: int | None = None) -> tuple[int, ...]:
    """Tokens of one sample at each cascade stage (stage s halves both sides S-1-s times); `width`: of a
    resolution x width image (default square)."""
    sides = (resolution, width or resolution)
    return tuple(
        (sides[0] // 2 ** (stages - 1 - s) // patch_size) * (sides[1] // 2 ** (stages - 1 - s) // patch_size)
        for s in range(stages)
    )


def plan_settings(cfg: Config, units: int, resolution: int | None = None) -> PlanSettings:
    """The planner's settings for a run on `units` data-parallel units, at crop size `resolution` (default
    data.resolution; a resolution schedule's phases plan at theirs)."""
    stages, resolution = cfg.cascade.stages, resolution or cfg.data.resolution
    return PlanSettings(
        batch=cfg.train.global_batch,
        stage_tokens=stage_tokens(resolution, cfg.model.patch_size, stages),
        weights=tuple(cfg.plan.stage_weights or [1.0] * stages),
        units=units,
        unit_budget=micro_tokens(cfg, resolution) * cfg.parallel.sp,
        cost=CostModel(cfg.model.depth, cfg.model.num_heads * cfg.model.head_dim, cfg.plan.token_overhead),
        seed=cfg.seed,
    )
