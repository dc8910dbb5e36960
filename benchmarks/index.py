"""Throughput of `pixelflow-data index` over webdataset tars on local disk and on a local S3 server
(moto_server on 127.0.0.1), in shards/s and MB/s, beside a plain standard-library scan of the same tars
(reading every member: the floor any indexer pays). One JSON line per result.

    python benchmarks/index.py --shards 16 --per-shard 200 --workers 1 2

Beside them, `energon prepare` (Megatron-Energon, a benchmark-only dependency: `pip install
megatron-energon`) on the same local tars, run in this process (its command, non-interactive, no
dataset.yaml), so neither side pays an interpreter start. Energon's remote paths go through
multi-storage-client profiles, not fsspec, so its S3 figure is not taken here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit  # noqa: E402
from data_tools.index import index_dataset  # noqa: E402
from pixelflow.data.storage import filesystem, storage_options  # noqa: E402
from tests.s3 import CREDENTIALS, MotoServer  # noqa: E402


def write_tars(folder: str, shards: int, per_shard: int, options: dict) -> int:
    """img2dataset-like tars (jpg + txt + json with width and height); returns their total bytes."""
    fs, root = filesystem(folder, **options)
    fs.makedirs(root, exist_ok=True)
    rng, total = np.random.default_rng(0), 0
    pixels = (rng.random((256, 320, 3)) * 255).astype("uint8")
    for shard in range(shards):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer) as writer:
            for i in range(per_shard):
                image = io.BytesIO()
                Image.fromarray(np.roll(pixels, i, axis=1)).save(image, format="JPEG", quality=90)
                meta = f'{{"width": 320, "height": 256, "punsafe": {i % 10 / 10}}}'
                writer.write({"__key__": f"{shard:05d}{i:04d}", "jpg": image.getvalue(), "txt": "x", "json": meta})
        fs.pipe_file(f"{root}/{shard:05d}.tar", buffer.getvalue())
        total += len(buffer.getvalue())
    return total


def plain_scan(folder: str, options: dict) -> None:
    fs, root = filesystem(folder, **options)
    for path in sorted(fs.ls(root, detail=False)):
        if path.endswith(".tar"):
            with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
                for info in tar:
                    member = tar.extractfile(info)
                    if member is not None:
                        member.read()


def energon_prepare(folder: str, workers: int) -> None:
    """`energon prepare FOLDER` as its command line runs it (it writes .tar.idx files and .nv-meta/ in place)."""
    from megatron.energon.cli.main import main as energon

    arguments = ["prepare", folder, "--non-interactive", "--split-ratio", "1,0,0", "--skip-dataset-yaml"]
    arguments += ["--num-workers", str(workers), "--no-progress", "--force-overwrite"]
    with contextlib.redirect_stdout(io.StringIO()):  # it describes the dataset on stdout; ours is JSON lines
        energon.main(arguments, standalone_mode=False)


def measure(name: str, run, shards: int, total: int, **extra) -> None:
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    emit({"benchmark": "index", "what": name, "shards": shards, "mb": round(total / 2**20, 1),
          "seconds": round(seconds, 3), "shards_per_s": round(shards / seconds, 2),
          "mb_per_s": round(total / 2**20 / seconds, 1), **extra})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    with MotoServer() as server, tempfile.TemporaryDirectory() as scratch:
        places = {"local": (f"{scratch}/tars", {}), "s3": ("s3://pixelflow-test/tars", {})}
        places["s3"] = (places["s3"][0], storage_options("s3://x", server.endpoint))
        filesystem("s3://pixelflow-test", **places["s3"][1])[0].mkdir("pixelflow-test")
        for place, (folder, options) in places.items():
            total = write_tars(folder, args.shards, args.per_shard, options)
            measure(f"plain tarfile scan, {place}", functools.partial(plain_scan, folder, options), args.shards, total)
            for workers in args.workers:
                meta = f"{scratch}/meta-{place}-{workers}"
                measure(
                    f"pixelflow-data index, {place}",
                    functools.partial(index_dataset, folder, meta, workers=workers, storage_options=options),
                    args.shards,
                    total,
                    workers=workers,
                    samples=args.shards * args.per_shard,
                )
                if place == "local" and importlib.util.find_spec("megatron.energon") is not None:
                    run = functools.partial(energon_prepare, folder, workers)
                    measure("energon prepare, local", run, args.shards, total, workers=workers)


if __name__ == "__main__":
    main()
