"""AdamW with linear warmup, then a constant learning rate (the paper's schedule) or a cosine decay to
`train.min_lr` at the last step (short runs such as the demo end better with it)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pixelflow.config import TrainConfig


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, fused: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """fused=True (CUDA) runs AdamW as one kernel per parameter group; otherwise the foreach path."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        weight_decay=cfg.weight_decay,
        foreach=None if fused else True,
        fused=True if fused else None,
    )
    warmup, floor = cfg.warmup_steps, cfg.min_lr / cfg.lr

    def factor(step: int) -> float:  # step counts optimizer steps already taken
        if step + 1 < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant" or cfg.steps <= warmup:
            return 1.0
        progress = min(1.0, (step + 1 - warmup) / (cfg.steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
