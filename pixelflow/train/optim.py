"""AdamW with linear warmup to a constant learning rate (the paper's schedule)."""

from __future__ import annotations

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
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        foreach=None if fused else True,
        fused=True if fused else None,
    )
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:  # step counts optimizer steps already taken
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
