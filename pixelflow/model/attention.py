"""Self-attention over a packed stream of variable-resolution sequences.

`Attention` holds the projections and q/k RMSNorm; the attention itself is a swappable `core` module
(`SdpaRunsAttention` by default) so parallelism can replace it from outside (e.g. sequence parallel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixelflow.model.embeddings import apply_rope
from pixelflow.model.layout import PackedLayout, Run


@dataclass(frozen=True)
class StreamContext:
    """What every block needs to know about the packed stream besides the tokens themselves."""

    layout: PackedLayout
    sequence_of_token: torch.Tensor  # (N,) int64: which sequence each token belongs to
    rope: dict[int, torch.Tensor]  # token-grid side -> (side*side, head_dim, 2) cos/sin table


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


def run_view(x: torch.Tensor, run: Run) -> torch.Tensor:
    """The run's tokens of a (N, heads, head_dim) tensor as a (count, heads, seqlen, head_dim) batch."""
    return x[run.start : run.end].reshape(run.count, run.seqlen, x.shape[1], x.shape[2]).transpose(1, 2)


class SdpaRunsAttention(nn.Module):
    """Exact varlen attention: one SDPA call per run of equal-length sequences (fast on CPU and GPU)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        outputs = []
        for run in ctx.layout.runs:
            table = ctx.rope[run.side]
            q_run, k_run = apply_rope(run_view(q, run), table), apply_rope(run_view(k, run), table)
            out = F.scaled_dot_product_attention(q_run, k_run, run_view(v, run))
            outputs.append(out.transpose(1, 2).reshape(run.count * run.seqlen, q.shape[1] * q.shape[2]))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, bias: bool):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.o_proj = nn.Linear(inner, dim, bias=bias)
        self.q_norm = RMSNorm(inner)  # over all heads together, as the reference does
        self.k_norm = RMSNorm(inner)
        self.core: nn.Module = SdpaRunsAttention()

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q = self.q_norm(self.q_proj(x)).view(shape)
        k = self.k_norm(self.k_proj(x)).view(shape)
        v = self.v_proj(x).view(shape)
        return self.o_proj(self.core(q, k, v, ctx))
