"""`pixelflow eval`: exactly N samples for evaluation, split over ranks, resumable, in the ADM layout.

Image i's condition is class i mod the classes given (or prompt i mod the prompts). Images are drawn in
batches of consecutive indices; batch k is rank k mod world's, seeded by (seed, its first index), so the
set of images does not depend on the number of ranks. Every image is written as `images/NNNNNN.png`
(through a temporary name, so a PNG is whole or absent); a rerun skips batches whose PNGs all exist.
Rank 0 then writes `samples_N.npz` (`arr_0`: N x H x W x 3 uint8, `labels`), the layout of the ADM
evaluation suite. `written_rank_R.jsonl` records which rank drew which index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from pixelflow.config import Config
from pixelflow.generate import Prompts, generate
from pixelflow.model import PixelFlowTransformer


def eval_sample(
    model: PixelFlowTransformer,
    cfg: Config,
    out: Path,
    count: int,
    classes: list[int] | None,
    prompts: list[str] | None,
    batch: int,
    seed: int,
    steps: int | None,
    cfg_scale: float | None,
    device: torch.device,
    encoder=None,
) -> Path | None:
    """Draw this rank's batches with `model` (loaded for sampling) and (rank 0) the npz; returns its path on
    rank 0."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    steps = steps if steps is not None else cfg.sample.steps_per_stage
    scale = cfg.sample.cfg if cfg_scale is None else cfg_scale
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    labels = [classes[i % len(classes)] for i in range(count)] if classes else None
    log = open(out / f"written_rank_{rank}.jsonl", "a")
    for first in range(rank * batch, count, world * batch):
        indices = list(range(first, min(first + batch, count)))
        if all((folder / f"{i:06d}.png").exists() for i in indices):
            continue
        conditions = [labels[i] for i in indices] if labels else None
        text = None
        if prompts is not None:
            text = Prompts.encode(encoder, [prompts[i % len(prompts)] for i in indices])
        with torch.inference_mode():
            images = generate(
                model,
                cfg,
                conditions,
                len(indices),
                seed * 1_000_003 + first,
                steps,
                scale,
                device,
                cfg.sample.solver,
                text,
            )
        for i, image in zip(indices, images.permute(0, 2, 3, 1).numpy()):
            temporary = folder / f".{i:06d}.png.tmp"
            Image.fromarray(image).save(temporary, format="PNG")
            os.replace(temporary, folder / f"{i:06d}.png")
            log.write(json.dumps({"index": i, "rank": rank}) + "\n")
        log.flush()
    log.close()
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    arrays = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(count)])
    path = out / f"samples_{count}.npz"
    extra = {"labels": np.asarray(labels, dtype=np.int64)} if labels else {}
    np.savez(path, arr_0=arrays, **extra)
    return path
