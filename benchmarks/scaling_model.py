"""Scaling model: step time and weak-scaling efficiency from 8 to 4,096 GPUs, from a measured one-GPU step.

    python benchmarks/scaling_model.py [--measured LINE.json] [--resolution 256 512 1024] ...
    torchrun --nproc_per_node 2 benchmarks/scaling_model.py --check parallel.dp_shard=2
    torchrun --nproc_per_node 4 benchmarks/scaling_model.py --check parallel.dp_shard=2 parallel.sp=2

Per step and rank it counts the payload of every collective (the all-gather output, the reduce-scatter
input, the all-reduce buffer, the all-to-all input) and its wire bytes under ring algorithms:
- FSDP2 over dp_shard x sp (S ranks): per micro-batch one all-gather of the parameters in forward and one
  in backward (every module, the root too, reshards after forward when S > 1, as `parallelize` sets it) in
  the parameter dtype, one reduce-scatter of the gradients in float32; wire (S-1)/S of each;
- HSDP over dp_replicate (R replicas): per micro-batch an all-reduce of the S-th gradient shard, wire
  2(R-1)/R;
- Ulysses over sp: 4 all-to-alls per block in forward (q, k, v to heads, the output back) and 4 in
  backward, each of the rank's token slice x width in the activation dtype, wire (sp-1)/sp;
- the planner's exchange of uint8 crops (one all-to-all per step);
- tensor parallel over tp (megatron-core layers, `--tp`): per block and micro-batch 2 all-reduces of the
  rank's tokens x width in forward (attention output, fc2) and 4 in backward (the input gradients of the
  column-parallel q, k, v and fc1; 2 with a fused QKV), wire 2(tp-1)/tp each, on the critical path; FSDP
  then shards the 1/tp of the parameters each rank holds.
Fixed per-step costs are added: the optimizer, EMA and gradient-norm passes over this rank's parameter
shard (44 bytes per parameter at `--hbm-gbs`) and `--syncs-per-step` host syncs of `--sync-us` each.
Time = compute x the planner's predicted imbalance + fixed costs + the communication not hidden behind compute
(`--overlap`: the FSDP share overlapped by prefetching; Ulysses sits on the critical path). Bandwidths:
NVLink within a node, `--inter-gbps` per node between nodes (default 8 x 400 Gb/s). One JSON line per
configuration (dp_replicate x dp_shard x sp, resolution).

`--check` runs the trainer's own step on CPU gloo ranks under torch.profiler and compares the payload bytes
the profiler saw per collective kind with the model's prediction for the same plan (one JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit  # noqa: E402
from pixelflow.data.planner import CostModel, PlanSettings, plan_step, stage_tokens  # noqa: E402

# the H200 figure of benchmarks/RESULTS.md: XL/4, 256 px, compiled, 64 images per step in micro-batches of 16
DEFAULT_MEASURED = {"bench": "train_step", "device": "NVIDIA H200", "batch": 64, "micro": 16, "step_s": 1.1111}
XL = {"depth": 28, "dim": 1152, "params": 676_600_000, "patch": 4}


@dataclass(frozen=True)
class Layout:
    replicate: int
    shard: int
    sp: int
    tp: int = 1

    @property
    def gpus(self) -> int:
        return self.replicate * self.shard * self.sp * self.tp


def step_volumes(
    layout: Layout,
    params: int,
    depth: int,
    dim: int,
    micro_tokens: list[int],
    param_bytes: int,
    activation_bytes: int,
    exchange_bytes: int = 0,
) -> dict[str, dict[str, float]]:
    """Per rank and step: {kind: {"payload": bytes, "wire": bytes}}. `micro_tokens` are the token counts
    of this rank's unit's micro-batches (whole streams; each SP rank holds 1/sp of each)."""
    group = layout.shard * layout.sp
    micro = len(micro_tokens)
    params = params / layout.tp  # the blocks' weights are split by tp before FSDP shards them
    out: dict[str, dict[str, float]] = {}
    if group > 1:
        gathered = 2 * params * param_bytes * micro
        out["all_gather"] = {"payload": gathered, "wire": gathered * (group - 1) / group}
        scattered = params * 4 * micro
        out["reduce_scatter"] = {"payload": scattered, "wire": scattered * (group - 1) / group}
    if layout.replicate > 1:
        reduced = params / group * 4 * micro
        out["all_reduce"] = {"payload": reduced, "wire": reduced * 2 * (layout.replicate - 1) / layout.replicate}
    if layout.sp > 1:
        sliced = sum(-(-tokens // layout.sp) for tokens in micro_tokens)
        swapped = 8 * depth * sliced * dim * activation_bytes
        out["all_to_all"] = {"payload": swapped, "wire": swapped * (layout.sp - 1) / layout.sp}
    if layout.tp > 1:
        sliced = sum(-(-tokens // layout.sp) for tokens in micro_tokens)
        reduced = 6 * depth * sliced * dim * activation_bytes
        out["tp_all_reduce"] = {"payload": reduced, "wire": reduced * 2 * (layout.tp - 1) / layout.tp}
    if exchange_bytes and layout.replicate * layout.shard > 1:
        data = layout.replicate * layout.shard
        out["exchange"] = {"payload": exchange_bytes, "wire": exchange_bytes * (data - 1) / data}
    return out


def layouts_for(gpus: int, per_node: int, tps: list[int] = (1,)) -> list[Layout]:
    """FSDP within a node and HSDP across nodes, with and without SP 2 / 4, for each tp (within a node)."""
    out = []
    for tp in tps:
        for sp in (1, 2, 4):
            if gpus % (sp * tp) or sp * tp > per_node:
                continue
            shard = min(per_node // (sp * tp), gpus // (sp * tp))
            replicate = gpus // (shard * sp * tp)
            out.append(Layout(replicate, shard, sp, tp))
            if replicate > 1:
                out.append(Layout(1, gpus // (sp * tp), sp, tp))  # FSDP over everything
    return out


def fixed_step_s(layout: Layout, params: int, args: argparse.Namespace) -> float:
    """Per-step work that does not scale with the batch: AdamW (param, grad, 2 moments read; param and
    moments written: 28 bytes), the EMA (12) and the gradient norm (4) over this rank's shard, and syncs."""
    shard = params / (layout.shard * layout.sp * layout.tp)
    return shard * 44 / (args.hbm_gbs * 1e9) + args.syncs_per_step * args.sync_us * 1e-6


def project(args: argparse.Namespace) -> None:
    measured = json.loads(Path(args.measured).read_text().splitlines()[0]) if args.measured else DEFAULT_MEASURED
    seconds_per_image = measured["step_s"] / measured["batch"]  # at 256 px, where it was measured
    cost = CostModel(XL["depth"], XL["dim"], args.token_overhead)
    base_cost = float(np.mean([cost.flops(t) for t in stage_tokens(256, XL["patch"], 4)]))
    for resolution in args.resolution:
        tokens = stage_tokens(resolution, XL["patch"], 4)
        compute_per_image = seconds_per_image * float(np.mean([cost.flops(t) for t in tokens])) / base_cost
        for gpus in args.gpus:
            for images in args.images_per_gpu:
                for layout in layouts_for(gpus, args.gpus_per_node, args.tp):
                    emit(projection(args, resolution, tokens, compute_per_image, gpus, images, layout, cost))


def projection(args, resolution, tokens, compute_per_image, gpus, images, layout, cost) -> dict:
    """One configuration's volumes, times and efficiency."""
    units = layout.replicate * layout.shard
    per_unit = images * layout.sp * layout.tp
    budget = int(args.micro_images * layout.sp * layout.tp * tokens[-1])
    plan = plan_step(PlanSettings(units * per_unit, tokens, (1.0,) * 4, units, budget, cost), 1)
    unit = int(np.argmax(plan.unit_costs))
    micro = [int(sum(tokens[s] for s in plan.stages[m])) for m in plan.micro_batches(unit)]
    volumes = step_volumes(layout, XL["params"], XL["depth"], XL["dim"], micro, 2, 2, per_unit * 3 * resolution**2)
    compute = compute_per_image * per_unit / (layout.sp * layout.tp) * plan.max_over_mean
    fixed = fixed_step_s(layout, XL["params"], args)
    intra, inter = args.nvlink_gbs * 1e9, args.inter_gbps / 8 * 1e9 / args.gpus_per_node  # per GPU
    fsdp_bandwidth = intra if layout.shard * layout.sp * layout.tp <= args.gpus_per_node else inter

    def wire(kind: str) -> float:
        return volumes.get(kind, {"wire": 0.0})["wire"]

    fsdp = (wire("all_gather") + wire("reduce_scatter")) / fsdp_bandwidth
    hsdp = wire("all_reduce") / inter
    ulysses = wire("all_to_all") / (intra if layout.sp <= args.gpus_per_node else inter)
    exchange = wire("exchange") / inter
    tensor_parallel = wire("tp_all_reduce") / intra
    exposed = max(0.0, fsdp + hsdp - args.overlap * compute) + ulysses + tensor_parallel + exchange
    step = compute + fixed + exposed
    return {
        "bench": "scaling_model",
        "resolution": resolution,
        "gpus": gpus,
        "dp_replicate": layout.replicate,
        "dp_shard": layout.shard,
        "sp": layout.sp,
        "tp": layout.tp,
        "images_per_gpu": images,
        "micro_batches": len(micro),
        "planner_max_over_mean": round(plan.max_over_mean, 3),
        "gib_per_rank": {k: round(v["wire"] / 2**30, 3) for k, v in volumes.items()},
        "compute_s": round(compute, 4),
        "fixed_s": round(fixed, 4),
        "comm_s": round(fsdp + hsdp + ulysses + tensor_parallel + exchange, 4),
        "exposed_comm_s": round(exposed, 4),
        "step_s": round(step, 4),
        "img_per_s": round(units * per_unit / step, 1),
        "weak_scaling_efficiency": round(compute_per_image * per_unit / (layout.sp * layout.tp) / step, 3),
    }


def check(overrides: list[str]) -> None:
    """The trainer's step on CPU gloo ranks under the profiler: collective payloads seen vs predicted."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from pixelflow.config import load_config
    from pixelflow.data.planner import plan_settings
    from pixelflow.parallel.world import init_world, shutdown
    from pixelflow.train.batches import UnitBatch
    from pixelflow.train.engines import build_engine
    from pixelflow.train.step import StepRunner

    torch.set_num_threads(1)
    base = [
        "run_dir=unused",
        "data.path=unused",
        "data.resolution=32",
        "model.depth=2",
        "model.num_heads=4",
        "model.head_dim=16",
        "train.global_batch=16",
        "train.micro_tokens=128",
        "train.steps=1",
    ]
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", base + overrides)
    world = init_world(cfg, "cpu")
    engine = build_engine(cfg, world)
    runner = StepRunner(cfg, world, engine)
    settings = plan_settings(cfg, world.dp_size)
    images = torch.randint(0, 256, (cfg.train.global_batch, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(cfg.train.global_batch, dtype=torch.long)
    seen: dict[str, float] = {}
    steps = 3
    for step in range(1, steps + 2):
        plan = plan_step(settings, step)
        mine = torch.from_numpy(plan.samples_of(world.dp_rank))
        if step == 1:  # warm-up outside the profile
            runner.run(UnitBatch(step, plan, images[mine], labels[mine]))
            continue
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            runner.run(UnitBatch(step, plan, images[mine], labels[mine]))
        for event in prof.events():
            kind = collective_kind(event)
            if kind:
                seen[kind] = seen.get(kind, 0.0) + payload_bytes(kind, event.input_shapes, event.input_dtypes)
    seen["all_reduce"] = seen.get("all_reduce", 0.0) - seen.get("reduce_scatter", 0.0)
    tokens = stage_tokens(32, cfg.model.patch_size, cfg.cascade.stages)
    params = sum(p.full_tensor().numel() if hasattr(p, "full_tensor") else p.numel() for p in engine.model.parameters())
    predicted: dict[str, float] = {}
    for step in range(2, steps + 2):
        plan = plan_step(settings, step)
        micro = [int(sum(tokens[s] for s in plan.stages[m])) or tokens[0] for m in plan.micro_batches(world.dp_rank)]
        layout = Layout(world.dp_replicate, world.dp_shard, world.sp)
        dim = cfg.model.num_heads * cfg.model.head_dim
        for kind, value in step_volumes(layout, params, cfg.model.depth, dim, micro, 4, 4).items():
            predicted[kind] = predicted.get(kind, 0.0) + value["payload"]
    totals = torch.tensor([seen.get(k, 0.0) for k in sorted(predicted)], dtype=torch.float64)
    dist.all_reduce(totals)  # mean over ranks (units differ in micro-batch count: they do not, by design)
    measured = dict(zip(sorted(predicted), (totals / world.size).tolist()))
    if world.is_main:
        emit(
            {
                "bench": "scaling_model_check",
                "layout": {"dp_replicate": world.dp_replicate, "dp_shard": world.dp_shard, "sp": world.sp},
                "steps": steps,
                "predicted_bytes_per_rank": {k: int(v / steps) for k, v in predicted.items()},
                "measured_bytes_per_rank": {k: int(v / steps) for k, v in measured.items()},
                "relative_error": {k: round(abs(measured[k] - predicted[k]) / predicted[k], 4) for k in predicted},
            }
        )
    shutdown(world)


COLLECTIVES = {
    "c10d::_allgather_base_": "all_gather",
    "c10d::_reduce_scatter_base_": "reduce_scatter",
    "_c10d_functional::all_to_all_single": "all_to_all",
    "gloo:all_reduce": "all_reduce",  # c10d::allreduce_ records no shapes (a tensor list); its gloo call does
}
# gloo has no reduce-scatter: it all-reduces the input (on a worker thread, not nested in the profile), so
# the all-reduces seen include every reduce-scatter's input once; `check` takes those out


def collective_kind(event) -> str | None:
    return COLLECTIVES.get(event.name)


def payload_bytes(kind: str, shapes: list, types: list) -> float:
    """The collective's payload from the op's recorded input shapes: the larger of output and input (the
    all-gather output, the reduce-scatter input, the all-reduce buffer, the all-to-all input)."""
    sizes = [int(np.prod(shape)) for shape in shapes[:2] if shape]
    element = 2 if types and types[0] in ("c10::BFloat16", "c10::Half", "BFloat16", "Half") else 4
    return max(sizes) * element if sizes else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with bytes measured on CPU gloo ranks")
    parser.add_argument("--measured", help="a file whose first line is a train_step benchmark JSON line")
    parser.add_argument("--resolution", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512, 4096])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--images-per-gpu", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--micro-images", type=float, default=16, help="token budget in top-stage images")
    parser.add_argument("--nvlink-gbs", type=float, default=450.0, help="GB/s per GPU and direction in a node")
    parser.add_argument("--inter-gbps", type=float, default=3200.0, help="Gb/s per node between nodes")
    parser.add_argument("--overlap", type=float, default=0.8, help="share of compute that can hide FSDP traffic")
    parser.add_argument("--token-overhead", type=float, default=0.0, help="planner cost model term (GPU: 0)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1], help="tensor-parallel sizes to project")
    parser.add_argument("--hbm-gbs", type=float, default=4300.0, help="GB/s of GPU memory (measured on the H200)")
    parser.add_argument("--syncs-per-step", type=int, default=0, help="host syncs per step (the trainer: 0)")
    parser.add_argument("--sync-us", type=float, default=50.0, help="GPU idle time per host sync, microseconds")
    parser.add_argument("overrides", nargs="*", help="--check: config overrides (the layout)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.check:
        check(args.overrides)
    else:
        project(args)


if __name__ == "__main__":
    main()
