"""`parallelize(model, cfg, device)`: everything that changes how the model runs, not what it computes.

Applied in this order, from outside the model: attention backend, activation checkpointing, then
torch.compile per block (compiling the checkpointed forward, as torchtitan does). Module structure and
parameter names stay as they were, so checkpoints, EMA and sampling see the plain model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixelflow.config import Config
from pixelflow.model import PixelFlowTransformer
from pixelflow.model.attention import set_attention_backend


def checkpointed_blocks(mode: str, depth: int) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward."""
    if mode == "none":
        return []
    every = 1 if mode == "full" else int(mode.removeprefix("every_"))
    return list(range(0, depth, every))


def _recompute_in_backward(block: nn.Module) -> None:
    forward = block.forward

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed


def parallelize(model: PixelFlowTransformer, cfg: Config, device: torch.device) -> PixelFlowTransformer:
    """Prepare a model (already on its device) for training or sampling according to cfg."""
    set_attention_backend(model, cfg.model.attention, device.type)
    for index in checkpointed_blocks(cfg.parallel.activation_checkpointing, len(model.blocks)):
        _recompute_in_backward(model.blocks[index])
    if cfg.parallel.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in model.blocks:
            block.compile(dynamic=False)
    return model
