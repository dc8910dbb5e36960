"""Sampling from a trained checkpoint into an image grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelflow.cascade import CascadeSchedule, cfg_scales, default_cfg_ramp, sample, to_uint8
from pixelflow.config import Config
from pixelflow.model import PixelFlowTransformer
from pixelflow.model.attention import set_attention_backend
from pixelflow.train.checkpoint import read_weights


def load_for_sampling(
    checkpoint: str | Path, weights: str = "ema", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PixelFlowTransformer, Config]:
    """(model in eval mode, its Config) from a run directory, a step folder, an export or an older
    single-file checkpoint."""
    state, cfg = read_weights(Path(checkpoint), weights)
    model = PixelFlowTransformer(cfg.model)
    model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype).eval()
    set_attention_backend(model, cfg.model.attention, torch.device(device).type)
    return model, cfg


def generate(
    model: PixelFlowTransformer,
    cfg: Config,
    labels: list[int] | None,
    count: int,
    seed: int,
    steps_per_stage: int,
    cfg_scale: float,
    device: torch.device | str = "cpu",
    solver: str = "euler",
) -> torch.Tensor:
    """(count, 3, R, R) uint8 images; labels (one per image) for class-conditional models. The model's
    own dtype sets the precision (bf16 weights on GPU; the sampler keeps its state in float32)."""
    schedule = CascadeSchedule.build(cfg.cascade.stages, cfg.cascade.gamma, cfg.cascade.num_train_timesteps)
    ramp = cfg.sample.cfg_ramp or default_cfg_ramp(schedule.stages)
    generator = torch.Generator(device=device).manual_seed(seed)
    label_tensor = torch.tensor(labels, device=device) if labels is not None else None
    dtype = next(model.parameters()).dtype

    def velocity(x: torch.Tensor, timesteps: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        return model.forward_images(x.to(dtype), timesteps, classes)

    images = sample(
        velocity,
        schedule,
        label_tensor,
        count,
        cfg.data.resolution,
        generator,
        steps_per_stage,
        cfg_scales(cfg_scale, ramp),
        model.null_class,
        cfg.model.in_channels,
        cfg.sample.shift,
        solver,
    )
    return to_uint8(images).cpu()


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    """Tile (B, 3, H, W) uint8 images into one PNG with a 2-pixel white gutter."""
    count, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    gap = 2
    canvas = np.full((rows * (height + gap) + gap, columns * (width + gap) + gap, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        top, left = gap + (i // columns) * (height + gap), gap + (i % columns) * (width + gap)
        canvas[top : top + height, left : left + width] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
