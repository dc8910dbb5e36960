"""Every GPU check of the project in one device command: runs each part as its own process (a crash or an
out-of-memory in one does not stop the rest), in priority order within one time budget, and writes one
JSON line per check to OUT/results.jsonl (name, ok, seconds, figures, error) as it goes, then prints a
summary table. `--cpu-dry-run` runs the same parts at tiny sizes on CPU (make test runs it), so the script
is tested before a GPU is lent.

    bash benchmarks/gpu_checks.sh                           # on the GPU machine: carried wheels, then this
    python benchmarks/gpu_checks.py --cpu-dry-run --out /tmp/dry

Parts, most important first: the XL/4 256 px trainer through `pixelflow train` (planner, exchange, async
checkpoint, periodic grid, then a resume), the train-step benchmark at the 2026-11-28 settings (micro 16
images, with a profile by op class) and at the trainer's token budget, sampling (8 images x 4
steps/stage, CFG 2.4, eager and as CUDA graphs; batch 256 per step, projected to 30 steps/stage), the
XL checkpoint save sync vs async, text-to-image with compile (graphs built), eval with FID (random
Inception weights: timing only), and two gloo ranks sharing the one GPU with CUDA tensors (FSDP2 and the
exchange, Ulysses, TP). Each part has a time cap; parts past the budget are recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Check:
    """One line of results: commands run in order (the first failure ends the check), then `collect`
    turns what they left (their JSON lines, files) into figures."""

    name: str
    limit_s: float  # on the GPU; the dry run's parts are small enough for the whole budget
    commands: list[list[str]]
    collect: Callable[[list[dict]], dict] = lambda lines: {"lines": lines}
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    """What differs between the GPU run and the CPU dry run."""

    dry: bool
    config: str
    model: list[str]  # overrides shrinking the model (none on the GPU)
    resolution: int
    images: int  # synthetic dataset size
    batch: int
    steps: int
    device: str

    @staticmethod
    def of(dry: bool) -> Sizes:
        if dry:
            tiny = ["model.depth=2", "model.num_heads=2", "model.head_dim=16"]
            return Sizes(True, "configs/demo.yaml", tiny, 32, 64, 8, 4, "cpu")
        return Sizes(False, "configs/pixelflow_xl_c2i_256.yaml", [], 256, 256, 32, 6, "cuda")


def torchrun(procs: int, port: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port)]


def last_metrics(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def checks(sizes: Sizes, work: Path) -> list[Check]:
    s = sizes
    data, t2i_data, encoder = work / "shapes", work / "shapes32", work / "t5"
    run_dir, t2i_dir = work / "xl_run", work / "t2i_run"
    synth = [PY, "-m", "data_tools", "synth", str(data), "--count", str(s.images), "--per-shard", "64"]
    trainer = [
        PY, "-m", "pixelflow", "train", s.config, f"run_dir={run_dir}", f"data.path={data}",
        f"data.resolution={s.resolution}", f"train.global_batch={s.batch}", f"train.device={s.device}",
        "train.log_every=1", "data.num_workers=2", f"checkpoint.every={s.steps // 2}", "checkpoint.async_save=true",
        f"sample.every={s.steps}", "sample.count=2", "sample.steps_per_stage=2", *s.model,
    ]  # fmt: skip
    steps = f"train.steps={s.steps}"

    def trained(lines: list[dict]) -> dict:
        grids = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
        committed = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        return {"metrics": last_metrics(run_dir), "grids": grids, "checkpoints": committed}

    bench = ["--config", s.config, "--device", s.device]
    # positional: one run of them, before the options (--batches and --steps take several values)
    overrides = [*s.model, f"data.resolution={s.resolution}"]
    timing = ["--steps", "2" if s.dry else "5", "--warmup", "2"] + (
        [] if s.dry else ["--compile", "--peak-tflops", "790"]
    )

    def step_bench(*options: str, extra: tuple[str, ...] = ()) -> list[str]:
        return [PY, "benchmarks/train_step.py", *timing, *bench, *overrides, *extra, *options]

    big = 16 if s.dry else 64

    def sample_bench(*options: str) -> list[str]:
        repeats = "1" if s.dry else "3"
        return [PY, "benchmarks/sample.py", "--cfg", "2.4", "--repeats", repeats, *bench, *overrides, *options]

    def projected(lines: list[dict]) -> dict:
        """Sampling time is linear in Euler steps: the batch's seconds at 1 step/stage, times 30."""
        out = {"lines": lines}
        if lines:
            out["projected_s_at_30_steps"] = round(lines[-1]["seconds"] * 30, 2)
            out["projected_img_per_s_at_30_steps"] = round(lines[-1]["batch"] / (lines[-1]["seconds"] * 30), 3)
        return out

    t2i = [
        PY, "-m", "pixelflow", "train", "configs/demo_t2i.yaml", f"run_dir={t2i_dir}", f"data.path={t2i_data}",
        f"text.encoder={encoder}", f"train.device={s.device}", "train.log_every=10", "checkpoint.every=1000",
        f"parallel.compile={not s.dry}", "data.num_workers=1",
        f"train.steps={10 if s.dry else 50}", "train.global_batch=16",
    ]  # fmt: skip

    def compiled(lines: list[dict]) -> dict:
        metrics = last_metrics(t2i_dir)
        return {key: metrics.get(key) for key in ("step", "graphs", "compiled_graphs", "img_per_s", "loss")}

    evals, inception = work / "eval", work / "random_inception.pth"
    count = 16 if s.dry else 256
    eval_args = [
        PY, "-m", "pixelflow", "eval", "--checkpoint", str(run_dir), "--out", str(evals), "--images", str(count),
        "--batch", str(8 if s.dry else 64), "--steps", "2", "--device", s.device,
    ]  # fmt: skip
    make_inception = [
        PY, "-c", "import sys, torch; from pixelflow.quality.inception import random_inception; "
        "torch.save(random_inception().state_dict(), sys.argv[1])", str(inception),
    ]  # fmt: skip
    fid = ["--reference", str(evals / f"samples_{count}.npz"), "--inception-weights", str(inception)]

    def scored(lines: list[dict]) -> dict:
        return json.loads((evals / "scores.json").read_text())

    tiny = ["model.depth=2", "model.num_heads=4", "model.head_dim=16", "data.resolution=32", "train.global_batch=8"]
    shared = [
        "-m", "pixelflow", "train", "configs/demo.yaml", f"data.path={t2i_data}", f"train.device={s.device}",
        "parallel.backend=gloo", "train.steps=4", "train.log_every=1", "checkpoint.every=4", "data.num_workers=0",
        *tiny,
    ]  # fmt: skip

    def two_ranks(name: str, port: int, *layout: str) -> Check:
        folder = work / name

        def done(lines: list[dict]) -> dict:
            metrics = last_metrics(folder)
            return {key: metrics.get(key) for key in ("step", "loss", "img_per_s", "graphs")}

        return Check(
            f"two gloo ranks on one device: {name}",
            45,
            [torchrun(2, port) + shared + [f"run_dir={folder}", *layout]],
            done,
        )

    small = [PY, "-m", "data_tools", "synth", str(t2i_data), "--count", "64", "--per-shard", "32", "--size", "32"]
    on_gpu = [  # levers with no CPU path: FP8 needs the hardware, autotuning is inductor's on the GPU
        Check(
            "train step with FP8 matmuls (parallel.float8, torchao)",
            80,
            [step_bench("--batches", str(big), "--micro", "16", extra=("parallel.float8=true",))],
        ),
        Check(
            "train step compiled with max-autotune-no-cudagraphs",
            150,
            [
                step_bench(
                    "--batches", str(big), "--micro", "16", extra=("parallel.compile_mode=max-autotune-no-cudagraphs",)
                )
            ],
        ),
    ]
    return [
        Check(
            "torch APIs the project relies on, and a small dataset for the later checks",
            20,
            [[PY, "benchmarks/torch_apis.py"], small],
            lambda lines: lines[0] if lines else {},
        ),
        Check(
            "XL/4 256 px through pixelflow train: planner, exchange, async checkpoint, grid, resume",
            200,
            [synth + ["--size", str(s.resolution)], trainer + [steps], trainer + [f"train.steps={s.steps + 2}"]],
            trained,
        ),
        Check(
            "train step at the 2026-11-28 settings (batch 64, micro 16 images), profiled",
            70,
            [step_bench("--batches", str(big), "--micro", "16" if not s.dry else "4", "--profile")],
        ),
        Check(
            "train step at the trainer's token budget (micro_tokens 65536)",
            60,
            [step_bench("--batches", str(big), "--micro-tokens", "65536" if not s.dry else "256")],
        ),
        Check("sampling 8 images x 4 steps/stage, CFG 2.4", 40, [sample_bench("--batch", "8", "--steps", "4")]),
        Check(  # the dry run samples eagerly: inductor on 2 CPU cores is tests/test_cascade.py's job
            "sampling 8 images x 4 steps/stage, compiled per stage shape, replayed as CUDA graphs",
            90,
            [sample_bench("--batch", "8", "--steps", "4", "--compile", "none" if s.dry else "reduce-overhead")],
        ),
        Check(
            "sampling throughput, batch 256 (1 step/stage, projected to 30)",
            60,
            [sample_bench("--batch", "16" if s.dry else "256", "--steps", "1")],
            projected,
        ),
        Check(
            "checkpoint save sync vs async (FSDP2, world size 1)",
            90,
            [
                torchrun(1, 29581)
                + ["benchmarks/checkpoint.py", "--config", s.config, "--dir", str(work / "ckpt"), "--repeats", "1"]
                + s.model
            ],
        ),
        Check(
            "text-to-image with compile: graphs built over varied captions",
            100,
            [[PY, "-m", "data_tools", "tiny-text-encoder", str(t2i_data), str(encoder)], t2i],
            compiled,
        ),
        Check("eval with FID (random Inception weights)", 60, [eval_args, make_inception, eval_args + fid], scored),
        two_ranks("fsdp2_and_exchange", 29582, "parallel.dp_shard=2"),
        two_ranks("ulysses", 29583, "parallel.dp_shard=1", "parallel.sp=2"),
        two_ranks("tensor_parallel", 29584, "parallel.dp_shard=1", "parallel.tp=2"),
        *([] if s.dry else on_gpu),
    ]


def json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return lines


def run_check(check: Check, deadline: float, dry: bool, env: dict[str, str]) -> dict:
    """The check's result line; never raises."""
    started = time.perf_counter()
    record = {"name": check.name, "ok": False, "seconds": 0.0, "figures": None, "error": None}
    lines: list[dict] = []
    stop = min(deadline, started + (deadline - started if dry else check.limit_s))
    for command in check.commands:
        left = stop - time.perf_counter()
        if left < 3:
            record["error"] = "skipped: out of time" if not lines and command is check.commands[0] else "out of time"
            break
        try:
            done = subprocess.run(
                command, cwd=REPO, env={**env, **check.env}, capture_output=True, text=True, timeout=left
            )
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stderr or b"")[-1500:]
            record["error"] = f"{tail.decode(errors='replace') if tail else ''}\ntimed out after {left:.0f} s"
            break
        lines += json_lines(done.stdout)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
            record["error"] = f"exit {done.returncode} from {' '.join(command[:6])} ...:\n{tail}"
            break
    else:
        try:
            record["figures"] = check.collect(lines)
            record["ok"] = True
        except Exception as exc:  # what the commands left is not what the check expects
            record["error"] = f"collecting figures: {type(exc).__name__}: {exc}"
    if not record["ok"] and record["figures"] is None and lines:
        record["figures"] = {"lines": lines}
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def summary(results: list[dict]) -> str:
    width = max(len(r["name"]) for r in results)
    rows = [f"{'check':<{width}}  ok     seconds  note"]
    for r in results:
        note = r["error"].strip().splitlines()[-1][:70] if r["error"] else ""  # the cause: the last line
        rows.append(f"{r['name']:<{width}}  {'yes' if r['ok'] else 'NO ':<5}  {r['seconds']:7.1f}  {note}")
    passed = sum(r["ok"] for r in results)
    rows.append(f"{passed} of {len(results)} checks passed")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_checks"), help="results.jsonl goes here")
    parser.add_argument("--work", default="/tmp/gpu_checks_work", help="scratch: datasets, runs (emptied)")
    parser.add_argument("--budget-s", type=float, default=440, help="all checks together (default 440)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same parts at tiny sizes on CPU")
    parser.add_argument("--only", nargs="+", help="run the checks whose names contain one of these")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.budget_s
    out, work = Path(args.out), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1" if args.cpu_dry_run else "4"))
    selected = [
        c for c in checks(Sizes.of(args.cpu_dry_run), work) if not args.only or any(o in c.name for o in args.only)
    ]
    results = []
    with open(out / "results.jsonl", "w") as file:
        for check in selected:
            print(f"=== {check.name}", flush=True)
            record = run_check(check, deadline, args.cpu_dry_run, env)
            results.append(record)
            file.write(json.dumps(record) + "\n")
            file.flush()
            print(json.dumps(record)[:2000], flush=True)
    print(summary(results), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
