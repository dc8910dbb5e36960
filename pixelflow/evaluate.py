"""`pixelflow eval`: exactly N samples for evaluation, split over ranks, resumable, in the ADM layout.

Image i's condition is class i mod the classes given (or prompt i mod the prompts). Images are drawn in
batches of consecutive indices; batch k belongs to part k mod n (a rank of n, or one of n SLURM array
tasks) and is seeded by (seed, its first index), so the images do not depend on how the work is split.
Every image is written as `images/NNNNNN.png` through a temporary name, so a PNG is whole or absent; a
rerun skips batches whose PNGs all exist. Then `samples_N.npz` (`arr_0`: N x H x W x 3 uint8, `labels`),
the layout of the ADM evaluation suite, and the scores asked for (pixelflow/quality).
`written_rank_R.jsonl` records which part drew which index.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelflow.config import Config, ConfigError
from pixelflow.generate import Prompts, generate
from pixelflow.model import PixelFlowTransformer
from pixelflow.progress import Progress


@dataclass
class EvalSpec:
    """What to draw: `count` images, image i of class i mod len(classes) (or prompt i mod len(prompts))."""

    count: int
    classes: list[int] | None = None
    prompts: list[str] | None = None
    batch: int = 16
    seed: int = 0
    steps: int | None = None  # Euler steps per stage; None = the config's
    cfg_scale: float | None = None

    def labels(self) -> list[int] | None:
        return [self.classes[i % len(self.classes)] for i in range(self.count)] if self.classes else None

    def batches(self, part: tuple[int, int]) -> list[list[int]]:
        """Part i of n: batches i, i + n, i + 2n, ... of consecutive indices."""
        index, parts = part
        starts = range(index * self.batch, self.count, parts * self.batch)
        return [list(range(first, min(first + self.batch, self.count))) for first in starts]


def draw_images(
    model: PixelFlowTransformer,
    cfg: Config,
    spec: EvalSpec,
    out: Path,
    part: tuple[int, int],
    device: torch.device,
    encoder=None,
) -> int:
    """Draw the missing images of part i of n (a rank, or a SLURM array task); returns how many it drew."""
    steps = spec.steps if spec.steps is not None else cfg.sample.steps_per_stage
    scale = cfg.sample.cfg if spec.cfg_scale is None else spec.cfg_scale
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    labels = spec.labels()
    batches = spec.batches(part)
    todo = [indices for indices in batches if not all((folder / f"{i:06d}.png").exists() for i in indices)]
    share, missing = sum(map(len, batches)), sum(map(len, todo))
    with (
        open(out / f"written_rank_{part[0]}.jsonl", "a") as log,
        Progress(share, "eval", "img", initial=share - missing) as bar,
    ):
        for indices in todo:
            text = None
            if spec.prompts is not None:
                text = Prompts.encode(encoder, [spec.prompts[i % len(spec.prompts)] for i in indices])
            with torch.inference_mode():
                images = generate(
                    model,
                    cfg,
                    [labels[i] for i in indices] if labels else None,
                    len(indices),
                    spec.seed * 1_000_003 + indices[0],
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
                log.write(json.dumps({"index": i, "rank": part[0]}) + "\n")
            log.flush()
            bar.update(len(indices))
    return missing


def write_npz(out: Path, spec: EvalSpec) -> Path:
    """`samples_N.npz` from the N PNGs (one clear error naming the first one missing)."""
    folder = out / "images"
    missing = [i for i in range(spec.count) if not (folder / f"{i:06d}.png").exists()]
    if missing:
        raise ConfigError(f"{folder}: {len(missing)} of {spec.count} images missing (e.g. {missing[0]:06d}.png)")
    arrays = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(spec.count)])
    labels = spec.labels()
    path = out / f"samples_{spec.count}.npz"
    np.savez(path, arr_0=arrays, **({"labels": np.asarray(labels, dtype=np.int64)} if labels else {}))
    return path


def score_samples(
    npz: Path,
    classifier: str | None = None,
    reference: str | None = None,
    inception_weights: str | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """The scores asked for of the samples in `npz`: class accuracy with a classifier file; FID, sFID,
    Inception Score, precision and recall against a reference batch with local Inception weights."""
    scores: dict = {}
    with np.load(npz) as saved:
        images, labels = saved["arr_0"], saved["labels"] if "labels" in saved else None
    if classifier:
        from pixelflow.quality.classifier import class_accuracy, load_classifier

        if labels is None:
            raise ConfigError("--classifier: the samples have no class labels (a text-to-image model?)")
        scores["class_accuracy"] = class_accuracy(load_classifier(classifier), images, labels)
    if reference:
        from pixelflow.quality.scores import inception_scores

        scores.update(inception_scores(images, reference, inception_weights, device))
    return scores
