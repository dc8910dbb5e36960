"""`parallelize(model, cfg, device, world)`: everything that changes how the model runs, not what it computes.

A short sequence of steps, each in its own function, applied from outside the model in torchtitan's
order: the attention kernel, fused q/k/v matmuls, FP8 linear layers (torchao), tensor parallel
(megatron-core layers), Ulysses sequence parallel around the kernel, activation checkpointing,
torch.compile per block, then FSDP2 (`fully_shard` per block and at the root over the mesh's `fsdp` view;
HSDP when dp_replicate > 1; bf16 parameters with float32 gradient reduction on CUDA). Parameter names
stay as they were, so checkpoints, EMA and sampling see the plain model's names; tensor parallelism leaves
its plan on the model (`model.tensor_parallel`) for checkpoints. Fused q/k/v keeps the three layers'
parameters and FP8 their names (torchao's Float8Linear is a Linear).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixelflow.config import Config, compile_enabled, fused_qkv_enabled
from pixelflow.errors import ConfigError
from pixelflow.model import PixelFlowTransformer
from pixelflow.model.attention import SelfAttention, set_attention_backend
from pixelflow.parallel.ulysses import UlyssesAttention
from pixelflow.parallel.world import World


def parallelize(
    model: PixelFlowTransformer, cfg: Config, device: torch.device, world: World | None = None
) -> PixelFlowTransformer:
    """Prepare a model (already on its device) for training or sampling according to cfg."""
    apply_attention_kernel(model, cfg.model.attention, device.type)
    if fused_qkv_enabled(cfg, device.type):
        apply_fused_qkv(model)
    if cfg.parallel.float8:
        apply_float8(model, device)
    if world is not None and world.tp > 1:
        apply_tensor_parallel(model, world)
    if world is not None and world.sp > 1:
        apply_ulysses(model, world)
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    if compile_enabled(cfg, device.type):
        apply_compile(model, cfg.parallel.compile_mode)
    if world is not None and world.distributed and cfg.engine == "fsdp":
        apply_fsdp(model, world, device)
    return model


def apply_attention_kernel(model: nn.Module, name: str, device_type: str) -> None:
    """The one place a kernel is chosen: training (either engine) and every sampler come through here."""
    set_attention_backend(model, name, device_type)


def apply_fused_qkv(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.fused_qkv = True


def apply_tensor_parallel(model: nn.Module, world: World) -> None:
    from pixelflow.parallel.tensor_parallel import apply_tensor_parallel as swap_layers

    assert world.tp_group is not None
    model.tensor_parallel = swap_layers(model, world.tp_group, world.tp, world.tp_rank)  # pyright: ignore[reportAttributeAccessIssue, reportArgumentType] (the plan rides on the model)


def apply_ulysses(model: nn.Module, world: World) -> None:
    assert world.sp_group is not None
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.core = UlyssesAttention(module.core, world.sp_group, world.sp)


def checkpointed_blocks(mode: str, depth: int) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward."""
    if mode == "none":
        return []
    every = 1 if mode == "full" else int(mode.removeprefix("every_"))
    return list(range(0, depth, every))


def apply_activation_checkpointing(model: PixelFlowTransformer, mode: str) -> None:
    for index in checkpointed_blocks(mode, len(model.blocks)):
        block = model.blocks[index]
        forward = block.forward

        @functools.wraps(forward)
        def recomputed(*args, forward=forward, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        block.forward = recomputed


def float8_problem(device: torch.device) -> str | None:
    """Why FP8 training cannot run here, or None."""
    if device.type != "cuda":
        return f"FP8 matmuls need a CUDA GPU of compute capability 8.9 or newer; this run is on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"FP8 matmuls need compute capability 8.9 or newer; {name} is {capability[0]}.{capability[1]}"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "needs torchao (pip install torchao), which is not installed"
    return None


def apply_float8(model: PixelFlowTransformer, device: torch.device, *, emulate: bool = False) -> None:
    """The blocks' linear layers as torchao Float8Linear (dynamic tensorwise scaling); the embeddings and
    the final layer stay in bf16, as torchtitan keeps its output layer. emulate: FP8 rounding in ordinary
    matmuls, on any device (how tests check this path on CPU)."""
    problem = None if emulate else float8_problem(device)
    if problem:
        raise ConfigError(f"parallel.float8: {problem}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def in_a_block(module: nn.Module, name: str) -> bool:
        usable = isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
        return usable and name.startswith("blocks.")

    convert_to_float8_training(model, config=Float8LinearConfig(emulate=emulate), module_filter_fn=in_a_block)


def apply_compile(model: PixelFlowTransformer, mode: str = "default", backend: str = "inductor") -> None:
    """torch.compile each block, one graph per micro-batch layout (and caption length bucket)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in model.blocks:
        block.compile(dynamic=False, backend=backend, mode=None if mode == "default" else mode)


def apply_fsdp(model: PixelFlowTransformer, world: World, device: torch.device) -> None:
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
