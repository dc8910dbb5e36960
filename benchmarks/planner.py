"""The stage planner: simulated balance at scale, the cost model's calibration, and a measured CPU spread.

    python benchmarks/planner.py                 # simulation: one JSON line per case and rule
    python benchmarks/planner.py --buckets       # simulation with aspect buckets (the planner alone)
    python benchmarks/planner.py --calibrate     # fit plan.token_overhead on this machine
    torchrun --nproc_per_node 4 benchmarks/planner.py --measure   # per-rank compute spread, 4 gloo ranks

Simulation: data-parallel units in {8, 64, 512, 4096}, resolutions {256, 512, 1024} with 4 stages (XL/4),
token budgets of 1-8 top-stage images per unit, global batches of 1-4 images per unit. Rules:
- `planner`: pixelflow.data.planner (exact shares, longest-first balance, budgeted equal micro-batches);
- `aligned`: the rule before it: every aligned group of 4 global samples holds each stage once (seeded),
  each unit takes an equal consecutive share, micro-batches of `budget` samples;
- `reference`: the reference code's: each GPU's batch cycles through the stages from stage 0 (one image
  per GPU trains stage 0 only), one micro-batch.
Each line: max_over_mean (predicted unit cost), lower_bound (no plan of these stage counts does better),
stage_share_error (largest |share - weight| over stages), budget_violations (micro-batches over budget),
microbatch_count_spread (max - min micro-batches per unit), plan_ms (planning time per step), and for the
planner where the bound exceeds 1.03, sp_for_target: the smallest sequence-parallel size that reaches it.

With --buckets, every sample also has an aspect bucket (a set of about equal-token shapes per resolution,
drawn per sample with fixed shares, as data would give them) and the planner deals (stage, bucket) kinds;
the budget is in square top-stage images, and the line adds `kinds` (distinct kinds in the step).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_name, emit  # noqa: E402
from pixelflow.config import PlanConfig  # noqa: E402
from pixelflow.data.planner import CostModel, PlanSettings, StepPlan, cost_lower_bound, plan_step, stage_tokens  # noqa: E402

STAGES, TARGET = 4, 1.03
XL = dict(depth=28, dim=1152)


def aligned_stages(step: int, count: int, seed: int = 0) -> np.ndarray:
    """The rule before the planner: each aligned group of 4 samples holds every stage once."""
    rng = np.random.default_rng([seed, step, 0x57A6E])
    whole, remainder = divmod(count, STAGES)
    plan = [stage for _ in range(whole) for stage in rng.permutation(STAGES).tolist()]
    leftover = [(step * remainder + i) % STAGES for i in range(remainder)]
    return np.array(plan + rng.permutation(leftover).tolist(), dtype=np.int64)


def baseline(rule: str, settings: PlanSettings, step: int) -> dict:
    """Unit costs, stage counts and micro-batch facts of the `aligned` or `reference` rule."""
    per_unit = settings.batch // settings.units
    if rule == "aligned":
        stages = aligned_stages(step, settings.batch).reshape(settings.units, per_unit)
        micro = max(1, settings.unit_budget // settings.stage_tokens[-1])  # budget in top-stage samples
        groups = [row[i : i + micro] for row in stages for i in range(0, per_unit, micro)]
    else:
        stages = np.tile(np.arange(per_unit) % STAGES, (settings.units, 1))
        groups = list(stages)
    tokens = np.asarray(settings.stage_tokens)
    counts = np.bincount(stages.reshape(-1), minlength=STAGES)
    return {
        "unit_costs": settings.stage_costs[stages].sum(1),
        "counts": counts,
        "violations": sum(int(tokens[g].sum() > settings.unit_budget) for g in groups),
        "micro_spread": 0,  # equal shares: equal counts
    }


def summary(settings: PlanSettings, unit_costs: np.ndarray, counts: np.ndarray, violations: int, spread: int) -> dict:
    weights = np.asarray(settings.weights) / sum(settings.weights)
    share_error = float(np.abs(counts / settings.batch - weights).max())
    return {
        "max_over_mean": round(float(unit_costs.max() / unit_costs.mean()), 4),
        "lower_bound": round(cost_lower_bound(settings.stage_costs, counts, settings.units), 4),
        "stage_share_error": round(share_error, 4),
        "budget_violations": violations,
        "microbatch_count_spread": spread,
    }


def planner_facts(plan: StepPlan) -> tuple[int, int]:
    """(budget violations over every micro-batch, micro-batch count spread over up to 64 units spread evenly)
    checked from the plan itself."""
    settings = plan.settings
    tokens = settings.kind_tokens[plan.kinds]
    if np.any(plan.micro >= plan.num_micro):
        return -1, -1
    per_micro = np.bincount(
        plan.units * plan.num_micro + plan.micro, weights=tokens, minlength=settings.units * plan.num_micro
    )
    violations = int((per_micro > settings.unit_budget).sum()) if settings.unit_budget else 0
    sampled = np.unique(np.linspace(0, settings.units - 1, min(64, settings.units)).astype(int))
    counts = [len(plan.micro_batches(int(unit))) for unit in sampled]
    return violations, max(counts) - min(counts)


def sp_for_target(units: int, per_unit: int, resolution: int, budget: float, overhead: float) -> int | None:
    """The smallest SP size (dividing the units) whose planned max/mean is within the target."""
    sp = 2
    while sp <= units:
        settings = case_settings(units // sp, per_unit * sp, resolution, budget * sp, overhead)
        if max(plan_step(settings, step).max_over_mean for step in (1, 2, 3)) <= TARGET:
            return sp
        sp *= 2
    return None


def case_settings(units: int, per_unit: int, resolution: int, budget: float, overhead: float) -> PlanSettings:
    tokens = stage_tokens(resolution, 4, STAGES)
    return PlanSettings(
        units * per_unit, tokens, (1.0,) * STAGES, units, int(budget * tokens[-1]), CostModel(**XL, overhead=overhead)
    )


BUCKETS = {  # (height, width) of each bucket (multiples of patch 4 x 2^3), and the share of samples it holds
    256: ([(256, 256), (224, 288), (288, 224), (192, 320), (320, 192), (160, 384)], [0.4, 0.15, 0.15, 0.1, 0.1, 0.1]),
    512: ([(512, 512), (448, 576), (576, 448), (384, 640), (640, 384), (320, 768)], [0.4, 0.15, 0.15, 0.1, 0.1, 0.1]),
}


def simulate_buckets(overhead: float, steps: int) -> None:
    for units, resolution, budget, per_unit in itertools.product(
        [8, 64, 512, 4096], [256, 512], [1, 2, 4, 8], [1, 2, 3, 4]
    ):
        square = case_settings(units, per_unit, resolution, budget, overhead)
        shapes, shares = BUCKETS[resolution]
        grids = tuple(stage_tokens(height, 4, STAGES, width) for height, width in shapes)
        settings = dataclasses.replace(square, bucket_tokens=grids)
        case = {"bench": "planner_buckets", "units": units, "resolution": resolution, "buckets": len(shapes),
                "budget_images": budget, "images_per_unit": per_unit, "batch": settings.batch}  # fmt: skip
        draws = [
            np.random.default_rng([step]).choice(len(shapes), settings.batch, p=shares) for step in range(steps + 1)
        ]
        plan_step(settings, 0, draws[0])  # warm caches
        worst, spent = None, 0.0
        for step in range(1, steps + 1):
            started = time.perf_counter()
            plan = plan_step(settings, step, draws[step])
            spent += time.perf_counter() - started
            counts = np.bincount(plan.stages, minlength=STAGES)
            line = summary(settings, plan.unit_costs, counts, *planner_facts(plan))
            line["lower_bound"] = round(plan.lower_bound, 4)  # over (stage, bucket) kinds
            line["kinds"] = int(np.unique(plan.kinds).size)
            if worst is None or line["max_over_mean"] > worst["max_over_mean"]:
                worst = line
        emit({**case, "rule": "planner", **worst, "plan_ms": round(spent / steps * 1e3, 3)})


def simulate(overhead: float, steps: int) -> None:
    for units, resolution, budget, per_unit in itertools.product(
        [8, 64, 512, 4096], [256, 512, 1024], [1, 2, 4, 8], [1, 2, 3, 4]
    ):
        settings = case_settings(units, per_unit, resolution, budget, overhead)
        case = {
            "bench": "planner",
            "units": units,
            "resolution": resolution,
            "budget_images": budget,
            "images_per_unit": per_unit,
            "batch": settings.batch,
        }
        plan_step(settings, 0)  # warm caches
        for rule in ("planner", "aligned", "reference"):
            worst, started = None, time.perf_counter()
            for step in range(1, steps + 1):
                if rule == "planner":
                    plan = plan_step(settings, step)
                    elapsed = time.perf_counter() - started
                    line = summary(
                        settings, plan.unit_costs, np.bincount(plan.stages, minlength=STAGES), *planner_facts(plan)
                    )
                    started = time.perf_counter() - elapsed  # the checks are not planning time
                else:
                    facts = baseline(rule, settings, step)
                    line = summary(
                        settings, facts["unit_costs"], facts["counts"], facts["violations"], facts["micro_spread"]
                    )
                if worst is None or line["max_over_mean"] > worst["max_over_mean"]:
                    worst = line
            record = {**case, "rule": rule, **worst}
            if rule == "planner":
                record["plan_ms"] = round((time.perf_counter() - started) / steps * 1e3, 3)
                if worst["lower_bound"] > TARGET:
                    record["sp_for_target"] = sp_for_target(units, per_unit, resolution, budget, overhead)
            emit(record)


def calibrate() -> None:
    """Fit time = a x depth (24 d^2 L + 4 d L^2) + b x depth d L over forward+backward runs of the trainer's
    model at several sequence lengths; plan.token_overhead = b / a."""
    from pixelflow.config import ModelConfig
    from pixelflow.model import PackedLayout, PixelFlowTransformer

    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, num_heads=8, head_dim=64, patch_size=4, num_classes=10)
    model = PixelFlowTransformer(cfg)
    d, rows, times = cfg.num_heads * cfg.head_dim, [], []
    for side, count in [(8, 64), (16, 16), (24, 8), (32, 4), (48, 2), (64, 1)]:
        layout = PackedLayout.from_sides([side] * count)
        tokens = torch.randn(layout.num_tokens, 3 * cfg.patch_size**2)
        timesteps, labels = torch.rand(count) * 999, torch.zeros(count, dtype=torch.long)

        def run(tokens=tokens, layout=layout, timesteps=timesteps, labels=labels) -> None:
            model(tokens, layout, timesteps, labels).square().mean().backward()

        run()
        started = time.perf_counter()
        repeats = 5
        for _ in range(repeats):
            run()
        seconds = (time.perf_counter() - started) / repeats
        length = side * side
        rows.append([count * cfg.depth * (24 * d * d * length + 4 * d * length**2), count * cfg.depth * d * length])
        times.append(seconds)
    (a, b), *_ = np.linalg.lstsq(np.array(rows, dtype=np.float64), np.array(times), rcond=None)
    predicted = np.array(rows) @ np.array([a, b])
    emit(
        {
            "bench": "planner_calibration",
            "device": device_name(torch.device("cpu")),
            "model": {"depth": cfg.depth, "dim": d},
            "token_overhead": round(float(b / a), 1),
            "seconds_per_gflop": round(float(a * 1e9), 5),
            "max_relative_fit_error": round(float(np.abs(predicted / np.array(times) - 1).max()), 3),
        }
    )


def measure(steps: int) -> None:
    """4 gloo ranks, each a plain model replica: per step every rank times forward+backward of the samples
    its rule gives it, one rank at a time (no two share the 2 cores), and the spread is max/mean."""
    import torch.distributed as dist

    from pixelflow.cascade import CascadeSchedule
    from pixelflow.config import load_config
    from pixelflow.train.engine import initial_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    overrides = [
        "run_dir=unused",
        "data.path=unused",
        "data.resolution=64",
        "model.patch_size=2",
        "model.depth=4",
        "model.num_heads=4",
        "model.head_dim=32",
        "train.steps=1",
    ]
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", overrides)
    model = initial_model(cfg)
    schedule = CascadeSchedule.build(cfg.cascade.stages)
    tokens = stage_tokens(64, 2, STAGES)
    overhead = cfg.plan.token_overhead
    for per_unit in (1, 1.5, 2, 3):
        batch = int(per_unit * world)
        settings = PlanSettings(batch, tokens, (1.0,) * STAGES, world, 0, CostModel(4, 128, overhead), cfg.seed)
        spreads = {"aligned": [], "planner": []}
        predicted, bounds_seen = {"aligned": [], "planner": []}, []
        for step in range(1, steps + 1):
            plan = plan_step(settings, step)
            bounds_seen.append(plan.lower_bound)
            aligned = aligned_stages(step, batch, cfg.seed)
            bounds = np.linspace(0, batch, world + 1).round().astype(int)  # equal consecutive shares
            choices = {
                "planner": plan.stages[plan.samples_of(rank)],
                "aligned": aligned[bounds[rank] : bounds[rank + 1]],
            }
            for rule, mine in choices.items():
                busy = time_samples(model, cfg, schedule, mine.tolist(), step, rank, world)
                gathered = [None] * world
                dist.all_gather_object(gathered, busy)
                spreads[rule].append(max(gathered) / (sum(gathered) / world))
                costs = (
                    plan.unit_costs
                    if rule == "planner"
                    else np.array(
                        [settings.stage_costs[aligned[bounds[r] : bounds[r + 1]]].sum() for r in range(world)]
                    )
                )
                predicted[rule].append(float(costs.max() / costs.mean()))
        if rank == 0:
            for rule in ("aligned", "planner"):
                emit(
                    {
                        "bench": "planner_measured",
                        "device": device_name(torch.device("cpu")),
                        "ranks": world,
                        "model": "depth 4, dim 128, 64 px, patch 2 (1024/256/64/16 tokens)",
                        "batch": batch,
                        "images_per_rank": per_unit,
                        "rule": rule,
                        "steps": steps,
                        "busy_max_over_mean": round(float(np.mean(spreads[rule])), 3),
                        "predicted_max_over_mean": round(float(np.mean(predicted[rule])), 3),
                        "lower_bound": round(float(np.mean(bounds_seen)), 3),
                    }
                )
    dist.destroy_process_group()


def time_samples(model, cfg, schedule, stages: list[int], step: int, rank: int, world: int) -> float:
    """Seconds of forward+backward for samples at `stages`, taken in turn by the ranks."""
    import torch.distributed as dist

    from pixelflow.cascade import build_training_batch, per_sequence_mse

    busy = 0.0
    for turn in range(world):
        dist.barrier()
        if turn != rank or not stages:
            continue
        images = torch.randint(0, 256, (len(stages), 3, 64, 64), dtype=torch.uint8)
        labels = torch.zeros(len(stages), dtype=torch.long)
        pairs = build_training_batch(
            images, labels, stages, schedule, cfg.model.patch_size, 0, step, list(range(len(stages)))
        )
        started = time.perf_counter()
        prediction = model(pairs.tokens, pairs.layout, pairs.timesteps, pairs.labels)
        per_sequence_mse(prediction, pairs.targets, pairs.layout).sum().backward()
        busy = time.perf_counter() - started
    return busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--buckets", action="store_true", help="simulate with aspect buckets")
    parser.add_argument("--steps", type=int, default=5, help="steps per case (simulation) or measured steps")
    parser.add_argument("--token-overhead", type=float, default=PlanConfig.token_overhead)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.calibrate:
        calibrate()
    elif args.measure:
        measure(args.steps)
    elif args.buckets:
        simulate_buckets(args.token_overhead, args.steps)
    else:
        simulate(args.token_overhead, args.steps)


if __name__ == "__main__":
    main()
