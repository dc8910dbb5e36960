"""`pixelflow-data`: offline dataset preparation."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from data_tools.ingest import KINDS, IngestError, Options, Report, ingest
from data_tools.synthetic import write_synthetic_dataset
from pixelflow.cli import run_command
from pixelflow.data.storage import storage_options
from pixelflow.errors import ConfigError, ShardFormatError, StorageError


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _synth(args: argparse.Namespace) -> None:
    options = storage_options(args.output, args.endpoint_url)
    manifest = write_synthetic_dataset(
        args.output, args.count, args.per_shard, args.size, args.seed, options, tuple(args.aspects)
    )
    print(f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {args.output}")


def _tiny_text_encoder(args: argparse.Namespace) -> None:
    from data_tools.text import tiny_text_encoder

    options = storage_options(args.dataset, args.endpoint_url)
    print(f"wrote {tiny_text_encoder(args.dataset, args.output, args.dim, args.layers, options)}")


def _train_classifier(args: argparse.Namespace) -> None:
    from data_tools.classifier import train_classifier

    print(json.dumps(asdict(train_classifier(args.output, args.resolution, args.steps, seed=args.seed))))


def run_encode_text(args: argparse.Namespace, part: tuple[int, int] | None = None):
    """Encode as the parsed arguments say (part i of n of the shards with part, or --part I/N)."""
    from data_tools.text import encode_text

    if part is None and getattr(args, "part", None):
        try:
            index, count = (int(x) for x in args.part.split("/"))
        except ValueError:
            raise ConfigError(f"--part {args.part}: must be I/N, e.g. 0/4") from None
        if not 0 <= index < count:
            raise ConfigError(f"--part {args.part}: I must be in 0..N-1")
        part = (index, count)
    options = storage_options(args.dataset, args.endpoint_url)
    report = encode_text(
        args.dataset, args.encoder, args.out, args.max_tokens, args.batch, args.device, part, options, not args.quiet
    )
    print(json.dumps(asdict(report)))
    return report


def add_encode_text_arguments(parser: argparse.ArgumentParser) -> None:
    """DATASET and the encode-text options (shared with `pixelflow-launch encode-text`)."""
    parser.add_argument("dataset", help="dataset directory or s3://bucket/prefix")
    parser.add_argument("--encoder", required=True, help="local T5 encoder directory (as text.encoder)")
    parser.add_argument("--out", help="where to write (default: DATASET/text-embeddings; text.embeddings)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="captions per forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_ingest_arguments(parser: argparse.ArgumentParser) -> None:
    """INPUT OUTPUT and the ingest options (shared with `pixelflow-launch ingest`)."""
    parser.add_argument("input", help="class folders, captioned folder, or a table file")
    parser.add_argument("output", help="output directory or s3://bucket/prefix")
    parser.add_argument("--kind", choices=KINDS, help="input kind (detected when not given)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials: the AWS environment)")
    parser.add_argument("--report", help="also write the report JSON here")
    parser.add_argument(
        "--per-shard", type=int, default=Options.per_shard, help="samples per shard (default %(default)s)"
    )
    parser.add_argument("--shard-size-mb", type=float, help="group by source megabytes instead of count")
    parser.add_argument(
        "--min-size", type=int, default=Options.min_size, help="skip images with a shorter side below this"
    )
    parser.add_argument(
        "--max-aspect", type=float, default=Options.max_aspect, help="skip images longer/shorter side above this"
    )
    parser.add_argument(
        "--max-side", type=int, default=Options.max_side, help="downscale images larger than this (0 = keep)"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=Options.max_pixels, help="skip larger images (default %(default)s)"
    )
    parser.add_argument(
        "--quality", type=int, default=Options.quality, help="JPEG quality when re-encoding (default %(default)s)"
    )
    parser.add_argument("--reencode", action="store_true", help="re-encode every image, not only changed ones")
    parser.add_argument(
        "--max-file-mb", type=float, default=Options.max_file_mb, help="skip larger input files (default %(default)s)"
    )
    parser.add_argument(
        "--allow-outside-root", action="store_true", help="read inputs and captions that resolve outside the input"
    )
    parser.add_argument("--class-names", help="a table's class names, one per line in label order")
    parser.add_argument("--create-bucket", action="store_true", help="create the s3:// output bucket if missing")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def read_class_names(path: str | None) -> tuple[str, ...]:
    """--class-names FILE: one class name per line, in label order."""
    if not path:
        return ()
    if not Path(path).is_file():
        raise ConfigError(f"--class-names {path}: not found")
    return tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())


def run_ingest(args: argparse.Namespace, part: tuple[int, int] | None = None) -> Report:
    """Ingest as the parsed arguments say (one slice of the shards with part); the whole report is printed
    and written to --report when part is None."""
    options = Options(
        per_shard=args.per_shard,
        shard_bytes=int(args.shard_size_mb * 2**20) if args.shard_size_mb else 0,
        min_size=args.min_size,
        max_aspect=args.max_aspect,
        max_side=args.max_side,
        quality=args.quality,
        reencode=args.reencode,
        max_pixels=args.max_pixels,
        max_file_mb=args.max_file_mb,
        allow_outside_root=args.allow_outside_root,
        class_names=read_class_names(args.class_names),
    )
    report = ingest(
        args.input,
        args.output,
        args.kind,
        options,
        args.workers,
        args.endpoint_url,
        not args.quiet,
        part=part,
        create_bucket=args.create_bucket,
    )
    text = json.dumps(asdict(report), indent=1)
    if args.report and part is None:
        Path(args.report).write_text(text + "\n")
    print(text)
    return report


def _ingest(args: argparse.Namespace) -> None:
    run_ingest(args)


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    from data_tools.index import IndexOptions

    parser.add_argument("source", help="folder of tars (local or s3://), a brace pattern, or a list file")
    parser.add_argument("--meta", help="write the indexes and manifest here instead of beside the tars")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials: the AWS environment)")
    parser.add_argument("--caption-field", help="captions from this field of each .json (default: .txt)")
    parser.add_argument("--label-field", help="labels from this field of each .json (default: .cls)")
    parser.add_argument("--num-classes", type=int, help="class count (default: 1 + the largest label)")
    parser.add_argument("--min-size", type=int, default=IndexOptions.min_size, help="skip shorter sides below this")
    parser.add_argument("--max-aspect", type=float, default=IndexOptions.max_aspect, help="0 = no limit")
    parser.add_argument("--where", action="append", default=[], help="keep samples whose json says e.g. punsafe<0.5")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--report", help="also write the report JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_index(args: argparse.Namespace, part: tuple[int, int] | None = None):
    """Index as the parsed arguments say (every n-th tar with part); the report is printed."""
    from data_tools.index import IndexOptions, index_dataset

    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num-classes {args.num_classes}: must be at least 1")
    options = IndexOptions(
        caption_field=args.caption_field,
        label_field=args.label_field,
        num_classes=args.num_classes,
        min_size=args.min_size,
        max_aspect=args.max_aspect,
        where=tuple(args.where),
    )
    stored = next((p for p in (args.source, args.meta) if p and p.startswith("s3://")), args.source)
    report = index_dataset(
        args.source,
        args.meta,
        options,
        workers=args.workers,
        storage_options=storage_options(stored, args.endpoint_url),
        progress=not args.quiet,
        part=part,
    )
    text = json.dumps(asdict(report), indent=1)
    if args.report and part is None:
        Path(args.report).write_text(text + "\n")
    print(text)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelflow-data", description="Prepare datasets in the pixelflow shard format."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ingest_cmd = commands.add_parser(
        "ingest",
        help="images (+ captions, labels) -> shards on local disk or S3",
        description="Ingest an image folder (ImageNet-style classes), a captioned folder (sidecar .txt) or a table "
        "(.parquet/.jsonl/.csv of paths and captions) into shards. Rerunning skips complete shards.",
    )
    add_ingest_arguments(ingest_cmd)
    ingest_cmd.set_defaults(func=_ingest)

    index_cmd = commands.add_parser(
        "index",
        help="adopt existing webdataset tars (img2dataset, ShardWriter) in place: indexes + manifest",
        description="Index webdataset tars where they are (nothing copied, the tars untouched) and write the "
        "manifest beside them or under --meta. Rerunning re-indexes only changed tars.",
    )
    add_index_arguments(index_cmd)
    index_cmd.set_defaults(func=run_index)

    synth = commands.add_parser(
        "synth",
        help="write a synthetic coloured-shapes dataset (16 classes)",
        description="Write a synthetic class-labelled dataset of coloured shapes as shards.",
    )
    synth.add_argument("output", help="output directory or s3://bucket/prefix")
    synth.add_argument("--count", type=int, default=2048, help="number of samples (default 2048)")
    synth.add_argument("--per-shard", type=int, default=256, help="samples per shard (default 256)")
    synth.add_argument("--size", type=int, default=80, help="image side in pixels (default 80)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--aspects",
        type=positive_number,
        nargs="+",
        default=[1.0],
        metavar="W/H",
        help="width / height ratios, in turn (default square): e.g. 1 0.75 1.333 0.5",
    )
    synth.add_argument("--endpoint-url", help="S3-compatible endpoint for an s3:// output")
    synth.set_defaults(func=_synth)

    tiny = commands.add_parser(
        "tiny-text-encoder",
        help="write a tiny random-weight T5 encoder + tokenizer trained on a dataset's captions (demos, tests)",
        description="Write a randomly initialised T5 encoder and a word-level tokenizer over DATASET's captions, "
        "saved like a transformers model: text.encoder=OUTPUT uses it as it would a real Flan-T5-XL.",
    )
    tiny.add_argument("dataset", help="dataset directory or s3://bucket/prefix (its captions)")
    tiny.add_argument("output", help="directory to write")
    tiny.add_argument("--dim", type=int, default=32, help="width of the encoder's tokens (model.text_dim)")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--endpoint-url", help="S3-compatible endpoint for an s3:// dataset")
    tiny.set_defaults(func=_tiny_text_encoder)

    classify = commands.add_parser(
        "train-classifier",
        help="train the small synthetic-shapes classifier that `pixelflow eval --classifier` scores samples with",
        description="Train a small CNN on freshly drawn synthetic shapes (seconds on CPU) and report its accuracy "
        "on a held-out set.",
    )
    classify.add_argument("output", help="file to write (e.g. demo_data/classifier.pt)")
    classify.add_argument("--resolution", type=int, default=32, help="side it classifies at (default 32)")
    classify.add_argument("--steps", type=int, default=1500)
    classify.add_argument("--seed", type=int, default=0)
    classify.set_defaults(func=_train_classifier)

    encode = commands.add_parser(
        "encode-text",
        help="precompute caption embeddings beside the shards (text.mode=precomputed)",
        description="Run a frozen T5 encoder over every shard's captions and store the unpadded float16 token "
        "embeddings beside the shards. Rerunning skips shards already encoded.",
    )
    add_encode_text_arguments(encode)
    encode.add_argument("--part", help="I/N: encode every N-th shard from the I-th (one task of an array)")
    encode.set_defaults(func=run_encode_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, (IngestError, ShardFormatError, StorageError, ConfigError))


if __name__ == "__main__":
    sys.exit(main())
