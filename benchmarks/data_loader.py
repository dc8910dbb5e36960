"""Data throughput from S3 shards: our loader against the plain webdataset pipeline, per worker process.

Starts a local S3 server (moto_server on 127.0.0.1), writes ImageNet-like JPEGs (500x375, about 120 KB),
ingests them to S3 (ingest images/s per process), then reads the shards with one DataLoader worker each way:
- plain: webdataset over s3fs, Pillow decode, the reference's transform: LANCZOS resize of the shorter side
  to 1.125 x 256 = 288, random 256 crop, flip;
- pixelflow: DataStream (lanes, block shuffle, resume cursors, retries) with the same output size and
  expand ratio, once with `bicubic` (torch's antialiased uint8 kernel, the default) and once with `lanczos`
  (Pillow's, as the plain pipeline).

    python benchmarks/data_loader.py --images 512 --epochs 3
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit  # noqa: E402
from data_tools.ingest import Options, ingest  # noqa: E402
from pixelflow.config import DataConfig  # noqa: E402
from pixelflow.data.loader import DataStream  # noqa: E402
from pixelflow.data.storage import storage_options  # noqa: E402
from tests.s3 import CREDENTIALS, MotoServer  # noqa: E402


def imagenet_like(seed: int) -> bytes:
    """A 500x375 JPEG of natural-image-like statistics (smooth colour field + texture), about 120 KB."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((9, 12, 3)) * 255).astype(np.uint8)).resize((500, 375), Image.BICUBIC)
    pixels = np.asarray(field).astype(np.float32) + rng.normal(0, 28, (375, 500, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def plain_pipeline(urls: list[str], endpoint: str, batch: int, side: int):
    """What a user would write: webdataset over s3fs, Pillow decode + resize + random crop + flip."""
    import importlib

    import s3fs
    import webdataset as wds

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function)

    def open_s3(url, mode="rb", bufsize=8192, **kw):
        return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).open(url, mode)

    gopen.gopen_schemes["s3"] = open_s3

    def transform(sample):
        image = sample["jpg"]
        scale = side / min(image.size)
        image = image.resize(
            (max(side, round(image.width * scale)), max(side, round(image.height * scale))), Image.LANCZOS
        )
        left, top = np.random.randint(0, image.width - 255), np.random.randint(0, image.height - 255)
        image = image.crop((left, top, left + 256, top + 256))
        if np.random.rand() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), sample["json"]["label"]

    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
        .shuffle(256)
        .decode("pil")
        .map(transform)
        .batched(batch)
        .repeat()
    )
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1))


def throughput(batches, count: int, batch: int) -> float:
    next(batches)  # start-up (worker spawn, first shard) is not throughput
    started = time.perf_counter()
    for _ in range(count // batch):
        next(batches)
    return (count // batch) * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=2.0, help="images read per pipeline, in dataset passes")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--expand-ratio", type=float, default=1.125, help="shorter side / crop (the reference's)")
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    with MotoServer() as server, tempfile.TemporaryDirectory() as scratch:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=server.endpoint).mkdir("bench")
        folder = Path(scratch) / "images"
        sizes = []
        for i in range(args.images):
            data = imagenet_like(i)
            sizes.append(len(data))
            (folder / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
            (folder / f"class{i % 4}" / f"{i:06d}.jpg").write_bytes(data)
        path = "s3://bench/imagenet"
        report = ingest(folder, path, "imagefolder", Options(per_shard=args.per_shard), 1, server.endpoint, False)
        emit(
            {
                "bench": "ingest",
                "images": report.inputs,
                "written": report.written,
                "processes": 1,
                "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1024, 1),
                "images_per_s": round(report.inputs / report.seconds, 1),
            }
        )
        count = int(args.images * args.epochs)
        urls = [f"s3://bench/imagenet/shard-{n:06d}.tar" for n in range(report.shards)]
        side = round(256 * args.expand_ratio)
        results = {
            "plain webdataset + Pillow": throughput(
                plain_pipeline(urls, server.endpoint, args.batch, side), count, args.batch
            )
        }
        for resize_filter in ("bicubic", "lanczos"):
            section = DataConfig(
                path=path,
                resolution=256,
                num_workers=1,
                shuffle_block=256,
                expand_ratio=args.expand_ratio,
                resize_filter=resize_filter,
            )
            options = storage_options(path, server.endpoint)
            stream = DataStream(section, global_batch=args.batch, seed=0, storage_options=options)
            results[f"pixelflow DataStream, {resize_filter}"] = throughput(stream, count, args.batch)
            stream.close()
        plain = results["plain webdataset + Pillow"]
        for name, value in results.items():
            emit(
                {
                    "bench": "data_loader",
                    "pipeline": name,
                    "workers": 1,
                    "resolution": 256,
                    "expand_ratio": args.expand_ratio,
                    "images": count,
                    "img_per_s_per_worker": round(value, 1),
                    "speedup": round(value / plain, 2),
                }
            )


if __name__ == "__main__":
    main()
