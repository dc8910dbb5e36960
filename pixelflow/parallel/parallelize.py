"""`parallelize(model, cfg, device, world)`: everything that changes how the model runs, not what it computes.

Applied in this order, from outside the model, as torchtitan does: attention kernel, Ulysses sequence
parallel around it, activation checkpointing, torch.compile per block, then FSDP2 (`fully_shard` per block
and at the root; HSDP when dp_replicate > 1; bf16 parameters with float32 gradient reduction on CUDA).
Parameter names stay as they were, so checkpoints, EMA and sampling see the plain model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixelflow.config import Config
from pixelflow.model import PixelFlowTransformer
from pixelflow.model.attention import SelfAttention, set_attention_backend
from pixelflow.parallel.ulysses import UlyssesAttention
from pixelflow.parallel.world import World


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


def parallelize(
    model: PixelFlowTransformer, cfg: Config, device: torch.device, world: World | None = None
) -> PixelFlowTransformer:
    """Prepare a model (already on its device) for training or sampling according to cfg."""
    set_attention_backend(model, cfg.model.attention, device.type)
    if world is not None and world.sp > 1:
        for module in model.modules():
            if isinstance(module, SelfAttention):
                module.core = UlyssesAttention(module.core, world.sp_group, world.sp)
    for index in checkpointed_blocks(cfg.parallel.activation_checkpointing, len(model.blocks)):
        _recompute_in_backward(model.blocks[index])
    if cfg.parallel.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in model.blocks:
            block.compile(dynamic=False)
    if world is not None and world.distributed and cfg.engine == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # inputs keep their dtype (timesteps stay float32); the trainer's autocast casts matmul inputs
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
        options = {
            "mesh": world.fsdp_mesh,
            "mp_policy": policy if device.type == "cuda" else MixedPrecisionPolicy(),
            # sharded over one rank, resharding after forward frees nothing and costs a second unshard
            "reshard_after_forward": world.dp_shard * world.sp > 1,
        }
        for block in model.blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
    return model
