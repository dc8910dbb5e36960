"""Sampling from a trained checkpoint into an image grid."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelflow.cascade import CascadeSchedule, cfg_scales, default_cfg_ramp, sample, to_uint8
from pixelflow.config import Config, size_granule
from pixelflow.devices import flush_denormals
from pixelflow.errors import ConfigError
from pixelflow.model import PixelFlowTransformer
from pixelflow.model.text_encoder import pad_tokens
from pixelflow.parallel.parallelize import apply_attention_kernel
from pixelflow.weights import read_weights


def load_for_sampling(
    checkpoint: str | Path, weights: str = "ema", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PixelFlowTransformer, Config]:
    """(model in eval mode, its Config) from a run directory, a step folder, an export or an older
    single-file checkpoint."""
    flush_denormals()
    state, cfg = read_weights(Path(checkpoint), weights)
    model = sampling_model(cfg, torch.device(device), dtype)
    model.load_state_dict(state)
    return model, cfg


def sampling_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype every sampler uses: bf16 on CUDA, float32 on the CPU (no fast bf16 there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sampling_model(cfg: Config, device: torch.device, dtype: torch.dtype) -> PixelFlowTransformer:
    """An eval-mode model of cfg on `device` in `dtype` with the config's attention kernel (weights random
    until loaded): what every sampler runs, from a checkpoint or from the trainer's EMA."""
    model = PixelFlowTransformer(cfg.model).to(device=device, dtype=dtype).eval()
    apply_attention_kernel(model, cfg.model.attention, device.type)
    return model


def checked_classes(classes: list[int] | None, cfg: Config, default: int) -> list[int]:
    """--classes (or the first `default` classes), each checked against the model."""
    classes = classes if classes is not None else list(range(default))
    bad = [c for c in classes if not 0 <= c < cfg.model.num_classes]
    if bad:
        raise ConfigError(f"--classes: {bad} outside 0..{cfg.model.num_classes - 1} for this checkpoint")
    return classes


def checked_size(text: str | None, cfg: Config) -> tuple[int, int]:
    """--size HxW (or N for N x N; default: the training resolution), in pixels, each side a multiple of
    `size_granule`."""
    if text is None:
        return cfg.data.resolution, cfg.data.resolution
    parts = text.lower().split("x")
    granule = size_granule(cfg)
    sides = [int(part) for part in parts if part.isdigit()] if len(parts) <= 2 else []
    if len(sides) != len(parts) or not all(side > 0 and side % granule == 0 for side in sides):
        raise ConfigError(
            f"--size {text}: must be HEIGHTxWIDTH (or one side) in pixels, each a positive multiple of "
            f"{granule} (patch_size x 2^(stages-1) of this model)"
        )
    return (sides[0], sides[-1])


def checked_prompts(texts: list[str]) -> list[str]:
    """The prompts a text-to-image model samples from: at least one."""
    if not texts:
        raise ConfigError("--prompt: a text-to-image model needs --prompt TEXT (or --prompt-file FILE)")
    return texts


def checked_text_encoder(path: str | None, cfg: Config, device: torch.device):
    """The text encoder at `path` (--text-encoder, else the config's), checked against the model's width."""
    from pixelflow.model.text_encoder import TextEncoder

    encoder = TextEncoder(path or cfg.text.encoder, cfg.text.max_tokens, device)
    if encoder.dim != cfg.model.text_dim:
        raise ConfigError(
            f"--text-encoder: {encoder.dim}-wide tokens, the model takes model.text_dim = {cfg.model.text_dim}"
        )
    return encoder


@dataclass
class Prompts:
    """Caption embeddings to sample from: one row per image, and the negative (unconditional) prompt's."""

    text: torch.Tensor  # (count, L, D)
    mask: torch.Tensor  # (count, L)
    negative: torch.Tensor  # (1, Ln, D)
    negative_mask: torch.Tensor  # (1, Ln)

    @staticmethod
    def encode(encoder, prompts: list[str], negative: str = "") -> Prompts:
        text, mask = encoder.encode(prompts)
        negative_text, negative_mask = encoder.encode([negative])
        return Prompts(text, mask, negative_text, negative_mask)

    @functools.cached_property
    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts then the negative prompt, padded to one length: built once, not at every Euler step."""
        length = max(self.text.shape[1], self.negative.shape[1])
        text, mask = pad_tokens(self.text, self.mask, length)
        negative, negative_mask = pad_tokens(self.negative, self.negative_mask, length)
        return torch.cat([text, negative]), torch.cat([mask, negative_mask])

    def select(self, index: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, mask) for condition indices: i >= 0 is prompt i, -1 the negative prompt."""
        table, table_mask = self.table
        rows = torch.where(index < 0, torch.full_like(index, len(self.text)), index)
        return table[rows].to(dtype), table_mask[rows]


def generate(
    model: PixelFlowTransformer,
    cfg: Config,
    labels: list[int] | None,
    count: int,
    seed: int | list[int],
    steps_per_stage: int,
    cfg_scale: float,
    device: torch.device | str = "cpu",
    solver: str = "euler",
    prompts: Prompts | None = None,
    on_steps: Callable[[int], None] | None = None,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(count, 3, H, W) uint8 images (`size` (H, W); default: the training resolution's square); labels (one
    per image) for class-conditional models, prompts (one per image) for text-conditional ones. The model's
    own dtype sets the precision (bf16 weights on GPU; the sampler keeps its state in float32). Class models
    ramp guidance up over the stages (the paper's schedule); text models guide with a constant scale, as the
    official text-to-image pipeline does."""
    schedule = CascadeSchedule.build(cfg.cascade.stages, cfg.cascade.gamma, cfg.cascade.num_train_timesteps)
    seeds = [seed] if isinstance(seed, int) else seed  # one per image: each gets the noise it gets alone
    generator = [torch.Generator(device=device).manual_seed(one) for one in seeds]
    dtype = next(model.parameters()).dtype
    if prompts is not None:  # conditions are indices into the prompts; -1 is the negative prompt
        ramp = cfg.sample.cfg_ramp or [1.0] * schedule.stages
        conditions, null = torch.arange(count, device=device), -1

        def velocity(x: torch.Tensor, timesteps: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:  # pyright: ignore[reportRedeclaration] (one velocity per kind of condition)
            assert index is not None  # text models always pass a condition (-1 is the negative prompt)
            text, mask = prompts.select(index, dtype)
            return model.forward_images(x.to(dtype), timesteps, None, text, mask)

    else:
        ramp = cfg.sample.cfg_ramp or default_cfg_ramp(schedule.stages)
        conditions = torch.tensor(labels, device=device) if labels is not None else None
        null = model.null_class

        def velocity(x: torch.Tensor, timesteps: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
            return model.forward_images(x.to(dtype), timesteps, classes)

    images = sample(
        velocity,
        schedule,
        conditions,
        count,
        size or cfg.data.resolution,
        generator,
        steps_per_stage,
        cfg_scales(cfg_scale, ramp),
        null,
        cfg.model.in_channels,
        cfg.sample.shift,
        solver,
        on_steps,
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
