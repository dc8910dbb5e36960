"""`pixelflow-data`: offline dataset preparation."""

from __future__ import annotations

import argparse
import sys

from data_tools.synthetic import write_synthetic_dataset


def _synth(args: argparse.Namespace) -> None:
    manifest = write_synthetic_dataset(args.output, args.count, args.per_shard, args.size, args.seed)
    print(f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelflow-data", description="Prepare datasets in the pixelflow shard format."
    )
    commands = parser.add_subparsers(dest="command", required=True)
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
    synth.set_defaults(func=_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
