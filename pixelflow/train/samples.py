"""Periodic sample grids during training (`sample.every`): fixed seeds and classes (or prompts), from the
EMA weights, so grids of different steps and runs compare.

Every rank gathers the full EMA weights (the checkpoint's collective) into a plain model (bf16 on CUDA, as
`pixelflow sample` runs), samples every world-size-th image of the grid in one batch, each image with the
noise of its own seed (so the grid is the same on any layout), and rank 0 gathers the images and writes
`samples/step_NNNNNNNN.png` (and logs it to wandb). Training waits only for the sampling itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from pixelflow.config import Config
from pixelflow.generate import Prompts, generate, sampling_dtype, sampling_model, save_grid
from pixelflow.model import PixelFlowTransformer
from pixelflow.parallel.world import World


class PeriodicSamples:
    def __init__(self, cfg: Config, world: World, run_dir: Path, encoder=None):
        self.cfg, self.world, self.folder = cfg, world, run_dir / "samples"
        self.model: PixelFlowTransformer | None = None
        count, model_cfg = cfg.sample.count, cfg.model
        self.labels = [i % model_cfg.num_classes for i in range(count)] if model_cfg.num_classes else None
        self.prompts = [cfg.sample.prompts[i % len(cfg.sample.prompts)] for i in range(count)]
        self.encoder = encoder

    def due(self, step: int) -> bool:
        return step % self.cfg.sample.every == 0  # built only when sample.every is set

    def write(self, step: int, ema_state: dict) -> Path | None:
        """The grid of this step (collective); the PNG's path on rank 0, None elsewhere."""
        device = self.world.device
        full = {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in ema_state.items()}
        if self.model is None:
            self.model = sampling_model(self.cfg, device, sampling_dtype(device))
        self.model.load_state_dict({name: t.to(device) for name, t in full.items()})
        mine = list(range(self.world.rank, self.cfg.sample.count, self.world.size))
        size = self.cfg.data.resolution_at(step)  # the resolution the run trains at now
        images = torch.zeros((self.cfg.sample.count, 3, size, size), dtype=torch.uint8)
        prompts = None
        if self.encoder is not None:  # every rank encodes every prompt: a sharded encoder needs them in step
            prompts = Prompts.encode(self.encoder, self.prompts)
        if mine:
            labels = [self.labels[index] for index in mine] if self.labels is not None else None
            if prompts is not None:
                rows = torch.tensor(mine)
                prompts = Prompts(prompts.text[rows], prompts.mask[rows], prompts.negative, prompts.negative_mask)
            with torch.no_grad():
                images[mine] = generate(
                    self.model,
                    self.cfg,
                    labels,
                    len(mine),
                    [self.cfg.seed + index for index in mine],
                    self.cfg.sample.steps_per_stage,
                    self.cfg.sample.guidance_scale,
                    device,
                    self.cfg.sample.solver,
                    prompts,
                    size=(size, size),
                )
        if self.world.distributed:
            gathered = images.to(device=device, dtype=torch.int32)
            dist.all_reduce(gathered)  # every image was written by exactly one rank, zero elsewhere
            images = gathered.to(torch.uint8).cpu()
        if not self.world.is_main:
            return None
        return save_grid(images, self.folder / f"step_{step:08d}.png")
