"""The step planner: exact stage shares, balanced predicted cost, token budgets, equal micro-batch counts,
determinism, and the same global batch planned over any number of units."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from pixelflow.data.planner import CostModel, PlanSettings, cost_lower_bound, plan_step, stage_tokens

XL = CostModel(depth=28, dim=1152, overhead=60.0)


def settings(units: int, per_unit: float, resolution: int = 256, budget_images: float = 4, **extra) -> PlanSettings:
    tokens = stage_tokens(resolution, 4, 4)
    return PlanSettings(
        batch=max(1, round(units * per_unit)),
        stage_tokens=tokens,
        weights=extra.pop("weights", (1.0, 1.0, 1.0, 1.0)),
        units=units,
        unit_budget=int(budget_images * tokens[-1]),
        cost=XL,
        seed=extra.pop("seed", 0),
    )


CASES = [
    settings(units, per_unit, resolution, budget)
    for units, per_unit, resolution, budget in itertools.product(
        [1, 3, 8, 64], [1, 1.5, 2, 4, 8], [256, 512], [1, 2.5, 8]
    )
]


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (1, 2, 3, 4), (0, 0, 1, 3), (0.1, 0.2, 0.3, 0.4)])
@pytest.mark.parametrize("batch", [1, 7, 32, 100])
def test_stage_shares_are_exact(weights, batch):
    shares = np.asarray(weights, dtype=float) / sum(weights) * batch
    totals = np.zeros(4)
    for step in range(1, 41):
        plan = plan_step(PlanSettings(batch, (1, 4, 16, 64), weights, 4, 0, XL), step)
        counts = np.bincount(plan.stages, minlength=4)
        assert counts.sum() == batch
        assert np.all((counts == np.floor(shares + 1e-9)) | (counts == np.ceil(shares - 1e-9))), counts
        totals += counts
    if np.allclose(shares, np.round(shares)):
        assert np.array_equal(totals, 40 * shares)  # integral shares: exact every step
    assert np.all(totals[np.asarray(weights) == 0] == 0)


@pytest.mark.parametrize("case", CASES, ids=lambda s: f"u{s.units}-b{s.batch}-t{s.stage_tokens[-1]}-k{s.unit_budget}")
def test_every_sample_once_within_budget_and_equal_micro_batch_counts(case):
    for step in (1, 2, 3):
        plan = plan_step(case, step)
        seen = []
        for unit in range(case.units):
            micro = plan.micro_batches(unit)
            assert len(micro) == plan.num_micro  # every unit runs the same number
            for samples in micro:
                tokens = sum(case.stage_tokens[s] for s in plan.stages[samples])
                assert tokens <= case.unit_budget
                assert list(samples) == sorted(samples, key=lambda s: (-plan.stages[s], s))
            seen += [int(s) for samples in micro for s in samples]
            assert sorted(int(s) for samples in micro for s in samples) == plan.samples_of(unit).tolist()
        assert sorted(seen) == list(range(case.batch))
        costs = np.bincount(plan.units, weights=case.stage_costs[plan.stages], minlength=case.units)
        assert np.array_equal(costs, plan.unit_costs)
        assert plan.max_over_mean >= plan.lower_bound - 1e-12


@pytest.mark.parametrize("case", CASES[::7], ids=lambda s: f"u{s.units}-b{s.batch}")
def test_balance_is_longest_first_to_the_least_loaded_unit(case):
    """Every unit gets as many samples of each stage as the plain LPT loop gives it (which sample of a
    stage goes where does not change any cost: the plan deals them by index)."""
    plan = plan_step(case, 5)
    loads = np.zeros(case.units, dtype=np.int64)
    expected = np.zeros((case.units, case.stages), dtype=np.int64)
    costs = case.stage_costs
    for stage in np.argsort(-costs, kind="stable"):
        for _ in np.flatnonzero(plan.stages == stage):
            unit = int(np.argmin(loads))
            expected[unit, stage] += 1
            loads[unit] += costs[stage]
    got = np.zeros_like(expected)
    np.add.at(got, (plan.units, plan.stages), 1)
    assert np.array_equal(got, expected) and np.array_equal(loads, plan.unit_costs)


@pytest.mark.parametrize("units", [8, 64, 512])
@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_balanced_within_three_percent_where_the_batch_allows(units, resolution):
    for per_unit in (4, 8):
        plan = plan_step(settings(units, per_unit, resolution, 8), 3)
        assert plan.lower_bound <= 1.03 and plan.max_over_mean <= 1.03
    one_each = plan_step(settings(units, 1, resolution, 8), 3)  # one image per unit: only SP can help
    assert one_each.max_over_mean == pytest.approx(one_each.lower_bound) and one_each.lower_bound > 3


def test_lower_bound_counts_the_costliest_samples_per_unit():
    costs, counts = np.array([1, 10, 100]), np.array([0, 3, 3])
    assert cost_lower_bound(costs, counts, 2) == pytest.approx(2 * 100 / (330 / 2))
    assert cost_lower_bound(costs, counts, 3) == pytest.approx(110 / 110)


def test_the_plan_is_a_pure_function_of_seed_step_and_layout():
    case = settings(8, 3, 512, 2.5)
    first, again, other = plan_step(case, 7), plan_step(case, 7), plan_step(case, 8)
    for field in ("stages", "units", "micro", "unit_costs"):
        assert np.array_equal(getattr(first, field), getattr(again, field))
    assert not np.array_equal(first.stages, other.stages)
    reseeded = plan_step(settings(8, 3, 512, 2.5, seed=1), 7)
    assert not np.array_equal(first.stages, reseeded.stages)


def test_another_number_of_units_plans_the_same_global_batch():
    """A resume on another world size: every sample keeps its stage; only who trains it changes."""
    for step in range(1, 6):
        plans = [plan_step(settings(units, 32 / units, 256, 8), step) for units in (1, 2, 4, 8)]
        for plan in plans[1:]:
            assert np.array_equal(plan.stages, plans[0].stages)
        assert [p.settings.batch for p in plans] == [32] * 4


def micro_layouts(plan) -> set[tuple[int, ...]]:
    """Every micro-batch's stage counts: what a compiled block specialises on."""
    stages = plan.settings.stages
    return {
        tuple(np.bincount(plan.stages[samples], minlength=stages))
        for unit in range(plan.settings.units)
        for samples in plan.micro_batches(unit)
    }


@pytest.mark.parametrize("batch", [24, 30])
def test_micro_batch_layouts_come_from_a_small_set_that_stops_growing(batch):
    """Compiled blocks build one graph per layout: the planner's layouts repeat from step to step."""
    case = PlanSettings(batch, stage_tokens(256, 4, 4), (1, 1, 1, 1), 8, 2 * 4096, XL)
    seen = [set() for _ in range(3)]
    for step in range(1, 301):
        seen[min(step // 100, 2)] |= micro_layouts(plan_step(case, step))
    assert seen[1] <= seen[0] and seen[2] <= seen[0]  # nothing new after the first 100 steps
    assert len(seen[0]) <= (4 if batch == 24 else 16)


SHAPES = [(256, 256), (192, 320), (320, 192), (128, 512)]  # aspect buckets of about 64k pixels


def bucketed(units: int, per_unit: float, budget_images: float = 4) -> PlanSettings:
    grids = tuple(stage_tokens(height, 4, 4, width) for height, width in SHAPES)
    return dataclasses.replace(settings(units, per_unit, 256, budget_images), bucket_tokens=grids)


def draw_buckets(case: PlanSettings, step: int) -> np.ndarray:
    return np.random.default_rng([step, 0xB0C]).choice(len(SHAPES), case.batch, p=[0.5, 0.2, 0.2, 0.1])


def test_stage_tokens_of_a_non_square_image_halve_both_sides():
    assert stage_tokens(192, 4, 4, 320) == (6 * 10, 12 * 20, 24 * 40, 48 * 80)  # 24 x 40 px up to 192 x 320
    assert stage_tokens(256, 4, 4, 256) == stage_tokens(256, 4, 4)


@pytest.mark.parametrize("units, per_unit, budget", [(1, 8, 2), (3, 2.5, 1), (8, 4, 2.5), (64, 1, 8), (64, 8, 4)])
def test_buckets_keep_stage_shares_budgets_and_equal_micro_batch_counts(units, per_unit, budget):
    case = bucketed(units, per_unit, budget)
    for step in (1, 2, 3):
        buckets = draw_buckets(case, step)
        plan = plan_step(case, step, buckets)
        assert np.array_equal(plan.stages, plan_step(case, step).stages)  # stages do not depend on buckets
        assert np.array_equal(plan.kinds, buckets * 4 + plan.stages)
        seen = []
        for unit in range(units):
            micro = plan.micro_batches(unit)
            assert len(micro) == plan.num_micro
            assert all(case.kind_tokens[plan.kinds[samples]].sum() <= case.unit_budget for samples in micro)
            seen += [int(s) for samples in micro for s in samples]
        assert sorted(seen) == list(range(case.batch))
        costs = np.bincount(plan.units, weights=case.kind_costs[plan.kinds], minlength=units)
        assert np.array_equal(costs, plan.unit_costs) and plan.max_over_mean >= plan.lower_bound - 1e-12


@pytest.mark.parametrize("units", [8, 64, 512])
def test_bucketed_plans_balance_within_three_percent_or_at_the_bound(units):
    for per_unit in (1, 4, 8):
        case = bucketed(units, per_unit, 8)
        plan = plan_step(case, 3, draw_buckets(case, 3))
        assert plan.max_over_mean <= max(1.03, plan.lower_bound + 1e-9), (per_unit, plan.lower_bound)


def test_one_bucket_plans_exactly_as_no_buckets():
    case = settings(8, 3, 256, 2.5)
    one = dataclasses.replace(case, bucket_tokens=(case.stage_tokens,))
    for step in range(1, 6):
        plain, bucketed_plan = plan_step(case, step), plan_step(one, step, np.zeros(case.batch, dtype=np.int64))
        for field in ("stages", "units", "micro", "unit_costs", "kinds"):
            assert np.array_equal(getattr(plain, field), getattr(bucketed_plan, field))
