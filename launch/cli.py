"""`pixelflow-launch` (also `python -m launch`): submit training to SLURM, watch it, cancel it, run it locally,
ingest, index, encode-text and eval as job arrays. Thin: parses, then calls launch.slurm / launch.local /
launch.arrays."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_tools.cli import add_encode_text_arguments, add_index_arguments, add_ingest_arguments
from data_tools.ingest import IngestError
from launch.slurm import LaunchError
from pixelflow.cli import add_eval_arguments, run_command
from pixelflow.config import SlurmConfig, load_config, redacting
from pixelflow.errors import USER_ERRORS


def _submit(args: argparse.Namespace) -> None:
    from launch.slurm import submit

    cfg = load_config(args.config, args.overrides)
    with redacting(cfg):
        job_id, run_dir = submit(cfg)
    print(f"submitted job {job_id}")
    print(f"run directory: {run_dir}")


def _status(args: argparse.Namespace) -> None:
    from launch.slurm import status

    print(status(args.target))


def _cancel(args: argparse.Namespace) -> None:
    from launch.slurm import cancel

    cancelled = cancel(args.target)
    print(f"cancelled {' '.join(cancelled)}" if cancelled else "nothing to cancel: no job of it is pending or running")


def _tail(args: argparse.Namespace) -> None:
    from launch.slurm import tail

    print(tail(Path(args.run_dir), args.rank, args.lines))


def _local(args: argparse.Namespace) -> int:
    from launch.local import run_local
    from launch.run_dir import prepare

    cfg = load_config(args.config, args.overrides)
    with redacting(cfg):
        run_dir = prepare(cfg)
    print(f"run directory: {run_dir}", flush=True)
    return run_local(run_dir / "config.yaml", args.nproc)


def check_tasks(args: argparse.Namespace) -> list[int]:
    if args.tasks < 1:
        raise LaunchError(f"--tasks {args.tasks}: must be at least 1")
    bad = [task for task in args.task or [] if not 0 <= task < args.tasks]
    if bad:
        raise LaunchError(f"--task {bad[0]}: must be in 0..{args.tasks - 1}")
    return args.task or list(range(args.tasks))


def array_slurm(args: argparse.Namespace, job_name: str) -> SlurmConfig:
    return SlurmConfig(
        partition=args.partition,
        cpus_per_task=args.cpus_per_task,
        gpus_per_node=args.gpus,
        mem_gb=args.mem_gb,
        time_min=args.time_min,
        job_name=job_name,
    )


def _ingest(args: argparse.Namespace) -> None:
    from data_tools.cli import run_ingest
    from launch.arrays import absolute, submit_array

    tasks = check_tasks(args)
    args.input, args.output, args.quiet = absolute(args.input), absolute(args.output), True
    ids, final = submit_array(args, array_slurm(args, "pixelflow-ingest"), tasks, run_ingest, final=True)
    print(f"submitted array tasks {' '.join(ids)}")
    print(f"submitted final step {final} (manifest and report; runs once every task succeeded)")


def _index(args: argparse.Namespace) -> None:
    from data_tools.cli import run_index
    from launch.arrays import absolute, submit_array

    tasks = check_tasks(args)
    args.source, args.quiet = absolute(args.source), True
    args.meta = absolute(args.meta) if args.meta else None
    ids, final = submit_array(args, array_slurm(args, "pixelflow-index"), tasks, run_index, final=True)
    print(f"submitted array tasks {' '.join(ids)}")
    print(f"submitted final step {final} (manifest and report; runs once every task succeeded)")


def _encode_text(args: argparse.Namespace) -> None:
    from data_tools.cli import run_encode_text
    from launch.arrays import absolute, submit_array

    tasks = check_tasks(args)
    args.dataset, args.encoder, args.quiet = absolute(args.dataset), absolute(args.encoder), True
    args.out = absolute(args.out) if args.out else None
    ids, _ = submit_array(args, array_slurm(args, "pixelflow-encode-text"), tasks, run_encode_text, final=False)
    print(f"submitted array tasks {' '.join(ids)}")


def _eval(args: argparse.Namespace) -> None:
    from launch.arrays import absolute, submit_array
    from pixelflow.cli import check_eval_arguments, run_eval
    from pixelflow.evaluate import Scoring, clear_drawn

    tasks = check_tasks(args)
    check_eval_arguments(args)
    Scoring.prepare(args.classifier, args.reference, args.inception_weights, "cpu")  # before any task draws
    if args.redraw:  # once, here: the tasks then record the new options
        clear_drawn(Path(args.out))
        args.redraw = False
    for name in ("checkpoint", "out", "prompt_file", "text_encoder", "classifier", "reference", "inception_weights"):
        if getattr(args, name):
            setattr(args, name, absolute(getattr(args, name)))
    ids, final = submit_array(args, array_slurm(args, "pixelflow-eval"), tasks, run_eval, final=True)
    print(f"submitted array tasks {' '.join(ids)}")
    print(f"submitted final step {final} (npz and scores; runs once every task succeeded)")


def add_array_arguments(parser: argparse.ArgumentParser, logs: str) -> None:
    parser.add_argument("--tasks", type=int, required=True, help="array tasks")
    parser.add_argument("--task", type=int, action="append", help="submit only this task (again); repeatable")
    parser.add_argument("--logs", default=logs, help=f"folder for the jobs' logs (default {logs})")
    parser.add_argument("--partition")
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per task (default 0)")
    parser.add_argument("--mem-gb", type=float, default=0)
    parser.add_argument("--time-min", type=int, default=24 * 60)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelflow-launch", description="Launch pixelflow training on SLURM (submitit) or locally."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser(
        "submit",
        help="submit a training job to SLURM",
        description="Submit CONFIG as a SLURM job: cluster options come from its slurm: section (overridable, "
        "e.g. slurm.nodes=2 slurm.partition=gpu). Preempted or time-limited jobs save, requeue and resume.",
    )
    submit.add_argument("config", help="YAML config")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    submit.set_defaults(func=_submit)

    status = commands.add_parser("status", help="state of a run's newest job, its step, loss and checkpoint")
    status.add_argument("target", help="run directory or job id")
    status.set_defaults(func=_status)

    cancel = commands.add_parser("cancel", help="cancel a job, or every pending/running job of a run directory")
    cancel.add_argument("target", help="run directory or job id")
    cancel.set_defaults(func=_cancel)

    tail = commands.add_parser("tail", help="the end of a rank's log of the run's newest job")
    tail.add_argument("run_dir")
    tail.add_argument("--rank", type=int, default=0, help="task (rank) whose log to show (default 0)")
    tail.add_argument("--lines", type=int, default=40)
    tail.set_defaults(func=_tail)

    local = commands.add_parser(
        "local",
        help="run the same job on this machine without SLURM",
        description="Train CONFIG on --nproc local ranks (no SLURM): same run directory layout, same stop and "
        "resume behaviour; exit status 75 means stopped by a signal, run again to resume.",
    )
    local.add_argument("config")
    local.add_argument("overrides", nargs="*", metavar="key=value")
    local.add_argument("--nproc", type=int, default=1, help="ranks (default 1)")
    local.set_defaults(func=_local)

    index = commands.add_parser(
        "index",
        help="index existing tars as a SLURM job array",
        description="pixelflow-data index split over --tasks array tasks plus a final step (manifest, report).",
    )
    add_index_arguments(index)
    add_array_arguments(index, "index_logs")
    index.set_defaults(func=_index)

    ingest = commands.add_parser(
        "ingest",
        help="ingest as a SLURM job array",
        description="pixelflow-data ingest split over --tasks array tasks plus a final step (manifest, report).",
    )
    add_ingest_arguments(ingest)
    add_array_arguments(ingest, "ingest_logs")
    ingest.set_defaults(func=_ingest)

    encode = commands.add_parser(
        "encode-text",
        help="precompute caption embeddings as a SLURM job array",
        description="pixelflow-data encode-text split over --tasks array tasks (every N-th shard each).",
    )
    add_encode_text_arguments(encode)
    add_array_arguments(encode, "encode_logs")
    encode.set_defaults(func=_encode_text)

    evaluate = commands.add_parser(
        "eval",
        help="sample and score for evaluation as a SLURM job array",
        description="pixelflow eval split over --tasks array tasks (every N-th batch each, the same images as one "
        "process draws), plus a final step that writes the npz and the scores.",
    )
    add_eval_arguments(evaluate)
    add_array_arguments(evaluate, "eval_logs")
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, (*USER_ERRORS, LaunchError, IngestError))


if __name__ == "__main__":
    sys.exit(main())
