"""`pixelflow eval`: exactly N samples for evaluation, split over ranks, resumable, in the ADM layout.

Image i's condition is class i mod the classes given (or prompt i mod the prompts). Images are drawn in
batches of consecutive indices; batch k belongs to part k mod n (a rank of n, or one of n SLURM array
tasks) and is seeded by (seed, its first index), so the images do not depend on how the work is split.
Every image is written as `images/NNNNNN.png` through a temporary name, so a PNG is whole or absent; a
rerun skips batches whose PNGs all exist. Then `samples_N.npz` (`arr_0`: N x H x W x 3 uint8, `labels`),
the layout of the ADM evaluation suite, and the scores asked for (pixelflow/quality).
`written_rank_R.jsonl` records which part drew which index.

`eval.json` records what drew the folder's images: the checkpoint (its path and the checksum of its
contents), every sampling option and the text encoder. A rerun with anything else is refused in one line
(its images would be labelled with the new options), or with `redraw` starts the folder afresh. Scoring
inputs (classifier, reference, Inception weights) are checked before the first image is drawn.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixelflow.config import Config, ParallelConfig
from pixelflow.errors import ConfigError
from pixelflow.generate import (
    Prompts,
    checked_classes,
    checked_prompts,
    checked_size,
    checked_text_encoder,
    generate,
    load_for_sampling,
    sampling_dtype,
)
from pixelflow.model import PixelFlowTransformer
from pixelflow.parallel.world import World, join_world, resolve_device, shutdown
from pixelflow.progress import Progress
from pixelflow.weights import resolve_source, source_identity


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
    size: str | None = None  # --size HxW (None: the training resolution's square); checked against the model

    def labels(self) -> list[int] | None:
        return [self.classes[i % len(self.classes)] for i in range(self.count)] if self.classes else None

    def batches(self, part: tuple[int, int]) -> list[list[int]]:
        """Part i of n: batches i, i + n, i + 2n, ... of consecutive indices."""
        index, parts = part
        starts = range(index * self.batch, self.count, parts * self.batch)
        return [list(range(first, min(first + self.batch, self.count))) for first in starts]


PROVENANCE = "eval.json"
DRAWN = ("images", PROVENANCE, "written_rank_*.jsonl", "samples_*.npz", "scores.json")


def provenance(spec: EvalSpec, cfg: Config, checkpoint: dict, encoder: dict | None) -> dict:
    """Everything the folder's images depend on."""
    height, width = checked_size(spec.size, cfg)
    return {
        "checkpoint": checkpoint,
        "text_encoder": encoder,
        "count": spec.count,
        "classes": spec.classes,
        "prompts": spec.prompts,
        "batch": spec.batch,
        "seed": spec.seed,
        "steps_per_stage": spec.steps if spec.steps is not None else cfg.sample.steps_per_stage,
        "guidance_scale": spec.cfg_scale if spec.cfg_scale is not None else cfg.sample.guidance_scale,
        "cfg_ramp": cfg.sample.cfg_ramp,
        "shift": cfg.sample.shift,
        "solver": cfg.sample.solver,
        "resolution": height if height == width else [height, width],  # a square's as before --size
        "stages": cfg.cascade.stages,
    }


def claim_folder(out: Path, record: dict, redraw: bool = False) -> None:
    """Make sure the folder's images are (or will be) drawn as `record` says: a new folder records it, one
    drawn otherwise is refused in one line naming what differs, or emptied first with redraw."""
    path = out / PROVENANCE
    if path.is_file() and not redraw:
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = {}
        differing = sorted(key for key in set(saved) | set(record) if saved.get(key) != record.get(key))
        if differing:
            raise ConfigError(
                f"--out {out}: its images were drawn with another {', '.join(differing)} (see {PROVENANCE}); "
                f"use another --out, or --redraw to draw them again"
            )
        return
    if redraw:
        clear_drawn(out)
    elif (out / "images").is_dir() and any((out / "images").iterdir()):
        raise ConfigError(
            f"--out {out}: holds images of unknown origin (no {PROVENANCE}); use another --out, or --redraw"
        )
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / f".{PROVENANCE}.tmp.{os.getpid()}"
    temporary.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def clear_drawn(out: Path) -> None:
    """Remove what an eval drew into `out` (images, records, npz, scores); nothing else."""
    for pattern in DRAWN:
        for found in out.glob(pattern):
            if found.is_dir():
                shutil.rmtree(found)
            else:
                found.unlink()


@dataclass
class Scoring:
    """What the scores asked for need, loaded and checked before any image is drawn."""

    classifier: Any = None  # quality.classifier.ShapeClassifier
    inception: Any = None  # quality.inception.FIDInception
    reference: dict | None = None

    @staticmethod
    def prepare(
        classifier: str | None, reference: str | None, inception_weights: str | None, device: torch.device | str
    ) -> Scoring:
        scoring = Scoring()
        if classifier:
            from pixelflow.quality.classifier import load_classifier

            scoring.classifier = load_classifier(classifier)
        if reference:
            from pixelflow.quality.inception import load_inception
            from pixelflow.quality.scores import read_reference

            if not inception_weights:
                raise ConfigError("--reference and --inception-weights: FID needs both (or neither)")
            scoring.reference = read_reference(reference)
            scoring.inception = load_inception(inception_weights, device)
        return scoring

    def score(self, npz: Path) -> dict:
        """The scores of the samples in `npz`: class accuracy with a classifier; FID, sFID, Inception Score,
        precision and recall against the reference."""
        scores: dict = {}
        with np.load(npz) as saved:
            images, labels = saved["arr_0"], saved["labels"] if "labels" in saved else None
        if self.classifier is not None:
            from pixelflow.quality.classifier import class_accuracy

            if labels is None:
                raise ConfigError("--classifier: the samples have no class labels (a text-to-image model?)")
            scores["class_accuracy"] = class_accuracy(self.classifier, images, labels)
        if self.reference is not None:
            from pixelflow.quality.scores import scores_against

            scores.update(scores_against(images, self.reference, self.inception))
        bad = [key for key, value in scores.items() if not math.isfinite(value)]
        if bad:
            raise ConfigError(f"{npz}: {', '.join(bad)} came out as {scores[bad[0]]}, not a number")
        return scores


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
    scale = cfg.sample.guidance_scale if spec.cfg_scale is None else spec.cfg_scale
    size = checked_size(spec.size, cfg)
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
                    size=size,
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
    extra = {"labels": np.asarray(labels, dtype=np.int64)} if labels else {}
    np.savez(path, arr_0=arrays, **extra)  # pyright: ignore[reportArgumentType] (arrays by name, as the ADM layout)
    return path


@dataclass
class EvalRequest:
    """One eval: the checkpoint, the folder, what to draw, and what to score it with."""

    checkpoint: Path
    out: Path
    spec: EvalSpec  # classes None = every class of the model; prompts for text models
    text_encoder: str | None = None  # None = the config's text.encoder
    scoring: tuple[str | None, str | None, str | None] = (None, None, None)  # classifier, reference, Inception
    device: str = "auto"
    redraw: bool = False


@dataclass
class EvalReport:
    drawn: int  # images this process drew (the rest already existed or belong to other parts)
    npz: str | None  # samples_N.npz, from the process that wrote it
    scores: dict


def run_eval(request: EvalRequest, part: tuple[int, int] | None = None) -> EvalReport:
    """With part (i, n), draw only that part (one task of a SLURM array); otherwise every rank of the
    process world draws its part, then rank 0 writes the npz and the scores. Everything that can refuse the
    eval is checked before the first image is drawn."""
    world = join_world(ParallelConfig(), device_name=request.device) if part is None else single(request.device)
    try:
        scoring = Scoring.prepare(*request.scoring, world.device) if part is None else None
        return _evaluate(request, part, world, scoring)
    finally:
        shutdown(world, together=False)  # rank 0 alone scores after the last barrier


def single(device_name: str) -> World:
    return World(0, 1, resolve_device(device_name))


def _evaluate(request: EvalRequest, part: tuple[int, int] | None, world: World, scoring: Scoring | None) -> EvalReport:
    device, out = world.device, request.out
    model, cfg = load_for_sampling(request.checkpoint, "ema", device, sampling_dtype(device))
    spec, encoder = request.spec, None
    if cfg.model.text_dim:
        checked_prompts(spec.prompts or [])
        encoder = checked_text_encoder(request.text_encoder, cfg, device)
    else:
        spec.prompts = None
        spec.classes = checked_classes(spec.classes, cfg, cfg.model.num_classes) if cfg.model.num_classes else None
    identity = source_identity(resolve_source(request.checkpoint))
    record = provenance(spec, cfg, identity, encoder.identity() if encoder is not None else None)
    if world.is_main:
        claim_folder(out, record, request.redraw and part is None)
    world.barrier()
    if not world.is_main:
        claim_folder(out, record)
    drawn = draw_images(model, cfg, spec, out, part or (world.rank, world.size), device, encoder)
    if part is not None:
        return EvalReport(drawn, None, {})
    world.barrier()
    if not world.is_main or scoring is None:
        return EvalReport(drawn, None, {})
    path = write_npz(out, spec)
    print(f"wrote {path}")
    scores = scoring.score(path)
    if scores:
        (out / "scores.json").write_text(json.dumps(scores, indent=1, allow_nan=False) + "\n")
        print(json.dumps(scores))
    return EvalReport(drawn, str(path), scores)
