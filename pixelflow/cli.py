"""`pixelflow` command line: thin parsing that calls into the library; user errors become one line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from pixelflow.config import SAMPLING_COMPILE_MODES, guidance_problem, load_config, redact, redacting, steps_problem
from pixelflow.errors import (
    EXIT_FAILED,
    EXIT_SIGNAL_BASE,
    EXIT_USER_ERROR,
    USER_ERRORS,
    ConfigError,
    RunFailure,
)
from pixelflow.paths import writable

REPORT = "this is a bug in pixelflow: please report it with the traceback above"


def _train(args: argparse.Namespace) -> int:
    from pixelflow.train.trainer import train

    overrides = list(args.overrides) + ([f"data.endpoint_url={args.endpoint_url}"] if args.endpoint_url else [])
    cfg = load_config(args.config, overrides)
    with redacting(cfg):
        result = train(cfg)
    state = f"stopped by {result.stop_signal} (exit 75: resume with the same command)" if result.stopped else "finished"
    print(f"run directory: {result.run_dir} ({state} at step {result.step})")
    return result.exit_status


def _export(args: argparse.Namespace) -> None:
    from pixelflow.weights import export

    print(f"wrote {export(Path(args.source), Path(args.destination), args.weights, args.force)}")


def check_sampling_options(args: argparse.Namespace) -> None:
    """--steps and --cfg, by the checks the config's sample.* values pass too."""
    steps = steps_problem(args.steps) if args.steps is not None else None
    scale = guidance_problem(args.cfg) if args.cfg is not None else None
    if steps:
        raise ConfigError(f"--steps {args.steps}: {steps}")
    if scale:
        raise ConfigError(f"--cfg {args.cfg}: {scale}")


def check_sample_arguments(args: argparse.Namespace) -> None:
    """Every sample option checked before any work (a bad --out used to surface after sampling)."""
    check_sampling_options(args)
    problems = [
        (args.per_class < 1, f"--per-class {args.per_class}: must be at least 1"),
        (args.num < 1, f"--num {args.num}: must be at least 1"),
        (
            Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"),
            f"--out {args.out}: must end in .png, .jpg or .jpeg",
        ),
        (Path(args.out).is_dir(), f"--out {args.out}: is a directory"),
        (not writable(Path(args.out)), f"--out {args.out}: cannot be written there"),
    ]
    refuse_first(problems)


def refuse_first(problems: list[tuple[bool, str]]) -> None:
    """One line for the first (bad, message) that is bad."""
    for bad, message in problems:
        if bad:
            raise ConfigError(message)


def check_eval_arguments(args: argparse.Namespace) -> None:
    """Every eval option checked before any file is made or image drawn."""
    check_sampling_options(args)
    out = Path(args.out)
    problems = [
        (args.images < 1, f"--images {args.images}: must be at least 1"),
        (args.batch < 1, f"--batch {args.batch}: must be at least 1"),
        (
            bool(args.reference) != bool(args.inception_weights),
            "--reference and --inception-weights: FID needs both (or neither)",
        ),
        (bool(args.reference) and args.images < 2, f"--images {args.images}: FID needs at least 2 images"),
        (out.exists() and not out.is_dir(), f"--out {out}: a file, not a folder"),
        (not writable(out), f"--out {out}: cannot be written there"),
    ]
    refuse_first(problems)


def _sample(args: argparse.Namespace) -> None:
    import torch

    from pixelflow.generate import checked_classes, checked_size, generate, load_for_sampling, sampling_dtype, save_grid
    from pixelflow.parallel.world import resolve_device
    from pixelflow.progress import Progress

    check_sample_arguments(args)
    device = resolve_device(args.device)
    model, cfg = load_for_sampling(args.checkpoint, args.weights, device, sampling_dtype(device))
    size = checked_size(args.size, cfg)
    if args.compile != "none":
        from pixelflow.parallel.parallelize import apply_compile

        apply_compile(model, args.compile)
    labels, prompts, columns = None, None, None
    if cfg.model.text_dim:
        prompts, columns = sample_prompts(args, cfg, device)
        count = len(prompts.text)
    elif args.prompt or args.prompt_file:
        raise ConfigError(f"--prompt: {args.checkpoint} is not a text-conditioned model (it has no model.text_dim)")
    elif cfg.model.num_classes > 0:
        classes = checked_classes(args.classes, cfg, min(cfg.model.num_classes, 8))
        labels = [c for _ in range(args.per_class) for c in classes]  # one column per class
        count = len(labels)
        columns = len(classes) if args.per_class > 1 else None
    else:
        count = args.num
    steps = args.steps if args.steps is not None else cfg.sample.steps_per_stage
    scale = cfg.sample.guidance_scale if args.cfg is None else args.cfg
    solver = args.solver or cfg.sample.solver
    with torch.inference_mode(), Progress(steps * cfg.cascade.stages, "sample", "step") as bar:
        images = generate(model, cfg, labels, count, args.seed, steps, scale, device, solver, prompts, bar.update, size)
    print(f"wrote {save_grid(images, args.out, columns)}")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then --prompt-file's non-empty lines (none given: an empty list)."""
    texts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.exists():
            raise ConfigError(f"--prompt-file {path}: not found")
        if not path.is_file():
            raise ConfigError(f"--prompt-file {path}: not a regular file (a file of prompts, one per line)")
        texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return texts


def sample_prompts(args: argparse.Namespace, cfg, device):
    """(the prompts' embeddings, one column per prompt) for a text-to-image model."""
    from pixelflow.generate import Prompts, checked_prompts, checked_text_encoder

    texts = checked_prompts(read_prompts(args))
    encoder = checked_text_encoder(args.text_encoder, cfg, device)
    per_image = [text for _ in range(args.per_class) for text in texts]  # one column per prompt
    return Prompts.encode(encoder, per_image, args.negative_prompt), len(texts) if args.per_class > 1 else None


def eval_request(args: argparse.Namespace):
    """`pixelflow eval`'s options as evaluate.py's request, every one checked first."""
    from pixelflow.evaluate import EvalRequest, EvalSpec

    check_eval_arguments(args)
    spec = EvalSpec(
        args.images, args.classes, read_prompts(args), args.batch, args.seed, args.steps, args.cfg, args.size
    )
    scoring = (args.classifier, args.reference, args.inception_weights)
    out, checkpoint = Path(args.out), Path(args.checkpoint)
    return EvalRequest(checkpoint, out, spec, args.text_encoder, scoring, args.device, args.redraw)


def run_eval(args: argparse.Namespace, part: tuple[int, int] | None = None):
    """`pixelflow eval` as parsed (with part (i, n): one task of a SLURM array); see evaluate.run_eval."""
    from pixelflow.evaluate import run_eval as evaluate

    return evaluate(eval_request(args), part)


def _eval(args: argparse.Namespace) -> None:
    run_eval(args)


def add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    """`pixelflow eval`'s options (shared with `pixelflow-launch eval`)."""
    evaluate.add_argument("--checkpoint", required=True, help="run directory, step folder or export")
    evaluate.add_argument("--out", required=True, help="folder to write")
    evaluate.add_argument("--images", type=int, required=True, help="images in all")
    evaluate.add_argument("--classes", type=int, nargs="+", help="classes in turn (default: all)")
    evaluate.add_argument("--prompt", action="append", help="a prompt (repeatable); with --prompt-file's, in turn")
    evaluate.add_argument("--prompt-file", help="prompts in turn, one per line (text-to-image models)")
    evaluate.add_argument("--text-encoder", help="local T5 encoder directory (default: the config's)")
    evaluate.add_argument("--batch", type=int, default=16, help="images per sampler call (default 16)")
    evaluate.add_argument("--steps", type=int, help="Euler steps per stage (default: the config's)")
    evaluate.add_argument("--cfg", type=float, help="CFG scale (default: the config's)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--size", help="HEIGHTxWIDTH of every image (default: the training resolution)")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    evaluate.add_argument("--classifier", help="report class accuracy with this file (pixelflow-data train-classifier)")
    evaluate.add_argument("--reference", help="reference batch .npz: images (arr_0) or statistics (mu, sigma)")
    evaluate.add_argument("--inception-weights", help="local pytorch-fid Inception weights (pt_inception-*.pth)")
    evaluate.add_argument(
        "--redraw", action="store_true", help="empty --out first when its images were drawn with other options"
    )


def _report(args: argparse.Namespace) -> None:
    from pixelflow.report import write_report

    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report"
    labels, written = write_report([Path(d) for d in args.run_dirs], out)
    print(f"runs: {', '.join(labels)}")
    for path in written:
        print(f"wrote {path}")


def _convert(args: argparse.Namespace) -> None:
    from pixelflow.compat import convert_official

    print(f"wrote {convert_official(args.source, args.destination, args.force)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelflow", description="Train and sample PixelFlow models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train or resume a run from a YAML config",
        description="Train (or resume, if the run directory has checkpoints) a model.",
    )
    train.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    train.add_argument("--endpoint-url", help="S3-compatible endpoint for an s3:// data.path (= data.endpoint_url)")
    train.set_defaults(func=_train)

    sample = commands.add_parser(
        "sample",
        help="sample an image grid from a checkpoint",
        description="Generate images with the cascade Euler sampler and write a PNG grid.",
    )
    sample.add_argument(
        "--checkpoint", required=True, help="run directory, step_NNNNNNNN folder, export, or older .pt file"
    )
    sample.add_argument("--out", required=True, help="PNG file to write")
    sample.add_argument("--classes", type=int, nargs="+", help="class ids (default: the first 8)")
    sample.add_argument("--prompt", action="append", help="a prompt, for text-to-image models (repeatable)")
    sample.add_argument("--prompt-file", help="prompts, one per line")
    sample.add_argument("--negative-prompt", default="", help="the unconditional side of guidance (default empty)")
    sample.add_argument("--text-encoder", help="local T5 encoder directory (default: the config's text.encoder)")
    sample.add_argument("--per-class", type=int, default=1, help="images per class or prompt (default 1)")
    sample.add_argument("--num", type=int, default=8, help="images for a model without classes (default 8)")
    sample.add_argument(
        "--steps", type=int, help="Euler steps per stage (default: the config's sample.steps_per_stage)"
    )
    sample.add_argument("--cfg", type=float, help="final-stage CFG scale; 0 disables guidance (default: config)")
    sample.add_argument("--solver", choices=["euler", "dopri5"], help="default: the config's sample.solver")
    sample.add_argument("--size", help="HEIGHTxWIDTH in pixels, e.g. 192x320 (default: the training resolution)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights (default ema)")
    sample.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    sample.add_argument(
        "--compile",
        choices=["none", *SAMPLING_COMPILE_MODES],
        default="none",
        help="compile every block, one graph per stage shape; reduce-overhead replays them as CUDA graphs",
    )
    sample.set_defaults(func=_sample)

    evaluate = commands.add_parser(
        "eval",
        help="sample exactly N images (one process or torchrun) and score them (FID, IS, ...), resumable",
        description="Sample --images N images (classes in turn, or the prompt file's lines in turn) split over the "
        "ranks, as OUT/images/NNNNNN.png and OUT/samples_N.npz (arr_0: N x H x W x 3 uint8, the ADM layout), then "
        "score them into OUT/scores.json (FID, sFID, IS, precision/recall with --reference and "
        "--inception-weights; class accuracy with --classifier). A rerun keeps the finished images.",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_eval)

    report = commands.add_parser(
        "report",
        help="PNG plots of one or more runs' metrics.jsonl (overlaid)",
        description="Plot loss (total and per stage), img/s, MFU, data wait, balance and grad norm over steps; "
        "several run directories are overlaid.",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="folder for the PNGs (default: FIRST_RUN_DIR/report)")
    report.set_defaults(func=_report)

    convert = commands.add_parser(
        "convert-official",
        help="convert a reference PixelFlow checkpoint (model.pt + config.yaml) to ours",
        description="Convert a checkpoint of github.com/ShoufaChen/PixelFlow (the model.pt + config.yaml its "
        "sample_ddp.py loads) into DESTINATION/model.safetensors and DESTINATION/config.yaml.",
    )
    convert.add_argument("source", help="directory with model.pt and config.yaml, or the model.pt file")
    convert.add_argument("destination", help="directory to write (an export: --checkpoint or resume=DESTINATION)")
    convert.add_argument("--force", action="store_true", help="replace an export already in DESTINATION")
    convert.set_defaults(func=_convert)

    export = commands.add_parser(
        "export",
        help="write consolidated weights (safetensors) + config from a run or checkpoint",
        description="Write OUT/model.safetensors and OUT/config.yaml from a run directory (its newest committed "
        "checkpoint), a step_NNNNNNNN folder or an older .pt file. The export samples and fine-tunes "
        "(resume=OUT).",
    )
    export.add_argument("source", help="run directory, step_NNNNNNNN folder or older .pt file")
    export.add_argument("destination", help="directory to write")
    export.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights (default ema)")
    export.add_argument("--force", action="store_true", help="replace an export already in DESTINATION")
    export.set_defaults(func=_export)

    return parser


def run_command(
    parser: argparse.ArgumentParser, argv: list[str] | None, user_errors: tuple[type[Exception], ...]
) -> int:
    """Run the chosen subcommand, which returns its exit status or None (0). A user error is one line on stderr
    and exit status 2; a RunFailure (disk full, a peer rank lost) one line and 1; a reader that closed the
    pipe (`... | head`) ends the command quietly, as the shell's own tools do."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow options (argparse stops collecting them at the first)
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return status if isinstance(status, int) else 0
    except user_errors as exc:  # bad config, data, checkpoint or CLI value: one line, no traceback
        print(f"{parser.prog}: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunFailure as exc:
        print(f"{parser.prog}: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more can reach the reader
        return EXIT_SIGNAL_BASE + signal.SIGPIPE
    except Exception:
        traceback.print_exc()
        print(f"{parser.prog}: internal error: {REPORT}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
