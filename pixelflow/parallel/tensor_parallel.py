"""Tensor parallelism with megatron-core's layers, applied to a built model from outside.

In every block, q/k/v are column-parallel by heads and the attention output row-parallel; MLP fc1 is
column-parallel and fc2 row-parallel (one all-reduce after each, in forward and in backward). Two things
the head split breaks are handled here:

- the q/k RMSNorm normalises over all heads together: `TensorParallelRMSNorm` sums the squares of its
  head slice and all-reduces them over the TP group (differentiably) before normalising;
- the AdaLN modulation projection's output is chunked 6 ways (shift, scale, gate twice): each rank holds
  its 1/tp of every chunk's rows, and the gathered output is put back in chunk order, so every chunk stays
  whole on every rank.

The swapped layers keep their parameter names; their weights are slices of the tp = 1 model's, so a run
starts from the same weights on any layout. `TensorParallelPlan` records which parameters are split along
which dimension, which is all the checkpoint needs to save them whole and reshard them to any tp.
The final layer and the embeddings stay replicated (they are small and see replicated activations).

megatron-core runs on the CPU path (parameters created on the host, no gradient-accumulation fusion) on
any device: the fused CUDA paths need TransformerEngine or apex, and the RNG tracker has nothing to do
because the model has no dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from pixelflow.model.attention import RMSNorm, _Projections
from pixelflow.model.transformer import FeedForward, TransformerBlock


def megatron_config(tp: int):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=False,  # weights are copied from the built model
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )


def _keep_plain_state(cls):
    """No `_extra_state` entry, saved or expected (megatron's layers add one for TransformerEngine, and a
    load hook that inserts it): the state holds exactly nn.Linear's names."""
    cls.get_extra_state = nn.Module.get_extra_state
    cls.set_extra_state = nn.Module.set_extra_state
    megatron_init = cls.__init__

    def __init__(self, *args, **kwargs):
        megatron_init(self, *args, **kwargs)
        self._load_state_dict_pre_hooks.clear()

    cls.__init__ = __init__
    return cls


def _layer_classes():
    """Imported on first use: megatron-core is slow to import and only tp > 1 needs it."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    @_keep_plain_state
    class ColumnLinear(ColumnParallelLinear):
        """Output features split over the TP group; returns this rank's slice (bias included)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    @_keep_plain_state
    class ChunkedColumnLinear(ColumnParallelLinear):
        """A projection whose output is chunked: each rank holds 1/tp of every chunk; returns the whole
        output in the original order (megatron's own gather allocates on CUDA, so it is done here)."""

        def __init__(self, *args, chunks: int, tp: int, **kwargs):
            super().__init__(*args, gather_output=False, **kwargs)
            self.chunks, self.tp = chunks, tp

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            local = super().forward(x)[0].unflatten(-1, (self.chunks, -1))
            return GatherReplicated.apply(local, self.tp_group, self.tp).flatten(-3)

    @_keep_plain_state
    class RowLinear(RowParallelLinear):
        """Input features split over the TP group; returns the all-reduced output (bias added once)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    return ColumnLinear, ChunkedColumnLinear, RowLinear


class GatherReplicated(torch.autograd.Function):
    """(..., chunks, n) per rank -> (..., chunks, tp, n) on every rank. The result feeds replicated
    computation, so every rank's gradient is already the whole one: backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
        ctx.rank = dist.get_rank(group)
        pieces = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return torch.stack(pieces, dim=-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.select(-2, ctx.rank).contiguous(), None, None


class TensorParallelRMSNorm(nn.Module):
    """RMSNorm over a dimension split across the TP group: the mean square is taken over all of it."""

    def __init__(self, local_dim: int, full_dim: int, eps: float, group: dist.ProcessGroup):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(local_dim))
        self.full_dim, self.eps, self.group = full_dim, eps, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        square_sum = dist_fn.all_reduce(x32.pow(2).sum(-1, keepdim=True), group=self.group)
        normed = x32 * torch.rsqrt(square_sum / self.full_dim + self.eps)
        return (self.weight * normed).to(x.dtype)


def local_slice(full: torch.Tensor, dim: int, chunks: int, tp: int, rank: int) -> torch.Tensor:
    """This rank's part of a tensor split along `dim` (1/tp of each of `chunks` equal chunks)."""
    parts = full.unflatten(dim, (chunks, tp, -1)).select(dim + 1, rank)
    return parts.flatten(dim, dim + 1).contiguous()


def whole(local: torch.Tensor, dim: int, chunks: int, tp: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The tensor every rank's `local_slice` came from (an all-gather over the TP group)."""
    pieces = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    stacked = torch.stack([piece.unflatten(dim, (chunks, -1)) for piece in pieces], dim=dim + 1)
    return stacked.flatten(dim, dim + 2)


@dataclass
class TensorParallelPlan:
    """Which parameters tensor parallelism split, along which dimension and in how many chunks."""

    group: dist.ProcessGroup
    size: int
    rank: int
    split: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (dim, chunks)

    def to_whole(self, name: str, local: torch.Tensor) -> torch.Tensor:
        dim, chunks = self.split[name]
        return whole(local, dim, chunks, self.size, self.group)

    def to_local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        dim, chunks = self.split[name]
        return local_slice(full, dim, chunks, self.size, self.rank)


def apply_tensor_parallel(model: nn.Module, group: dist.ProcessGroup, size: int, rank: int) -> TensorParallelPlan:
    """Swap every block's projections, q/k norms and MLP for their TP versions (in place)."""
    column, chunked, row = _layer_classes()
    config = megatron_config(size)
    plan = TensorParallelPlan(group, size, rank)

    def swap(parent: nn.Module, name: str, prefix: str) -> None:
        old = getattr(parent, name)
        full = f"{prefix}{name}"
        if isinstance(old, RMSNorm):
            new = TensorParallelRMSNorm(old.weight.numel() // size, old.weight.numel(), old.eps, group)
            plan.split[f"{full}.weight"] = (0, 1)
        else:
            kind, chunks = LAYER_KINDS[name]
            options: dict[str, Any] = dict(
                config=config, init_method=lambda weight: None, bias=old.bias is not None, tp_group=group
            )
            if kind == "row":
                new = row(old.in_features, old.out_features, input_is_parallel=True, skip_bias_add=False, **options)
                plan.split[f"{full}.weight"] = (1, 1)
            elif chunks > 1:
                new = chunked(old.in_features, old.out_features, chunks=chunks, tp=size, **options)
            else:
                new = column(old.in_features, old.out_features, gather_output=False, **options)
            if kind == "column":
                plan.split[f"{full}.weight"] = (0, chunks)
                if old.bias is not None:
                    plan.split[f"{full}.bias"] = (0, chunks)
        with torch.no_grad():
            for param_name, param in new.named_parameters():
                value = getattr(old, param_name)
                key = f"{full}.{param_name}"
                param.copy_(plan.to_local(key, value) if key in plan.split else value)
        setattr(parent, name, new.to(device=old.weight.device, dtype=old.weight.dtype))

    for index, block in enumerate(model.blocks):  # pyright: ignore[reportArgumentType] (a PixelFlowTransformer's ModuleList)
        if not isinstance(block, TransformerBlock):
            raise TypeError(f"blocks.{index}: tensor parallelism knows TransformerBlock, not {type(block)}")
        prefix = f"blocks.{index}."
        swap(block, "modulation", prefix)
        for attention_name in ("attn", "cross_attn"):
            attention = getattr(block, attention_name)
            if attention is None:
                continue
            assert isinstance(attention, _Projections)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
                swap(attention, name, f"{prefix}{attention_name}.")
            attention.num_heads //= size
        assert isinstance(block.mlp, FeedForward)
        for name in ("fc1", "fc2"):
            swap(block.mlp, name, f"{prefix}mlp.")
    return plan


LAYER_KINDS = {  # layer name -> (column | row, output chunks)
    "modulation": ("column", 6),
    "q_proj": ("column", 1),
    "k_proj": ("column", 1),
    "v_proj": ("column", 1),
    "o_proj": ("row", 1),
    "fc1": ("column", 1),
    "fc2": ("row", 1),
}


class WholeTensors:
    """A checkpoint part (model, EMA or optimizer) whose tensor-parallel tensors travel whole.

    state_dict() gives every split tensor (and its optimizer moments) at its tp = 1 shape, so a checkpoint
    is the same on any tp and loads on any other; load_state_dict() takes this rank's slice back. Memory:
    one split tensor is assembled whole at a time per rank while saving.
    """

    def __init__(self, part, plan: TensorParallelPlan):
        self.part, self.plan = part, plan

    def state_dict(self) -> dict:
        return self._convert(self.part.state_dict(), None, self._whole)

    def load_state_dict(self, state: dict) -> None:
        self.part.load_state_dict(self._convert(state, self.part.state_dict(), self._local))

    def _split_name(self, path: tuple[str, ...]) -> str | None:
        return next((key for key in path if key in self.plan.split), None)

    def _convert(self, tree: dict, template: dict | None, convert, path: tuple[str, ...] = ()) -> dict:
        out = {}
        for key, value in tree.items():
            here = (*path, key)
            mine = template.get(key) if isinstance(template, dict) else None
            if isinstance(value, dict):
                out[key] = self._convert(value, mine, convert, here)
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and (name := self._split_name(here)):
                out[key] = convert(name, value, mine)
            else:
                out[key] = value
        return out

    def _whole(self, name: str, value: torch.Tensor, _) -> torch.Tensor:
        local = value.full_tensor() if hasattr(value, "full_tensor") else value  # pyright: ignore[reportAttributeAccessIssue] (a DTensor's)
        return self.plan.to_whole(name, local)

    def _local(self, name: str, value: torch.Tensor, mine: torch.Tensor | None) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        whole_value = value.full_tensor() if isinstance(value, DTensor) else value
        local = self.plan.to_local(name, whole_value)
        if isinstance(mine, DTensor):
            local = local.to(device=mine.device, dtype=mine.dtype)
            return distribute_tensor(local, mine.device_mesh, mine.placements, src_data_rank=None)
        return local


def clip_grad_norm(model: nn.Module, max_norm: float, plan: TensorParallelPlan) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient: split parameters' squares summed over the TP group,
    replicated ones counted once (every TP rank holds the same copy)."""
    split, replicated = [], []
    for name, param in model.named_parameters():
        if param.grad is not None:
            (split if name in plan.split else replicated).append(param)

    def square_norm(params: list[nn.Parameter]) -> torch.Tensor:
        if not params:
            return torch.zeros((), device=next(model.parameters()).device)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm) ** 2  # pyright: ignore[reportAttributeAccessIssue] (a DTensor's)

    split_square = square_norm(split)
    dist.all_reduce(split_square, group=plan.group)
    total = (split_square + square_norm(replicated)).sqrt()
    torch.nn.utils.clip_grads_with_norm_(split + replicated, max_norm, total, foreach=True)
    return total
