"""Attention over a packed stream of variable-resolution sequences, and its swappable backends.

`SelfAttention` and `CrossAttention` hold projections and q/k RMSNorm (over all heads together, as the
reference does). The attention itself is the `core` submodule of `SelfAttention`, chosen by name
(`set_attention_backend`), so parallelism or a faster kernel replaces it from outside the model:

- `sdpa_runs`: one SDPA call per run of equal-length sequences, torch choosing the kernel. Exact, fast on
  CPU and GPU; the default (forcing cuDNN measured no faster on an H200, see benchmarks/RESULTS.md).
- `sdpa_dense`: SDPA over the whole stream with a block-diagonal mask. Exact on any device but O(N^2)
  memory: the reference the others are tested against.
- `varlen`: torch.nn.attention.varlen.varlen_attn (CUDA).
- `flex`: compiled flex_attention with a document mask (CUDA).
- `flash`: flash_attn.flash_attn_varlen_func, when the package is installed (CUDA).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixelflow.model.embeddings import apply_rope
from pixelflow.model.layout import PackedLayout, Piece, Run


@dataclass(frozen=True)
class StreamContext:
    """What every block needs to know about the packed stream besides the tokens themselves.

    `layout` is the whole stream (self-attention always sees whole sequences); `pieces` are the tokens this
    call holds: all of them, or one rank's slice under sequence parallelism.
    """

    layout: PackedLayout
    pieces: tuple[Piece, ...]
    sequence_of_token: torch.Tensor  # (N,) int64: which sequence each token of the whole stream belongs to
    cu_seqlens: torch.Tensor  # (B+1,) int32 sequence starts, for varlen kernels
    rope: dict[tuple[int, int], torch.Tensor]  # token grid (rows, cols) -> (rows*cols, head_dim, 2) cos/sin table
    text: torch.Tensor | None = None  # (B, text_len, text_dim) text tokens for cross-attention
    text_bias: torch.Tensor | None = None  # (B, 1, 1, text_len) additive mask: 0 keep, -10000 padding

    def token_rope(self) -> torch.Tensor:
        """(N, head_dim, 2) rotary table for every token of the stream, for per-token kernels."""
        return torch.cat([self.rope[run.grid].repeat(run.count, 1, 1) for run in self.layout.runs])


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


def from_run_view(out: torch.Tensor) -> torch.Tensor:
    """(count, heads, seqlen, head_dim) -> (count * seqlen, heads * head_dim) tokens."""
    count, heads, seqlen, head_dim = out.shape
    return out.transpose(1, 2).reshape(count * seqlen, heads * head_dim)


def cat_runs(outputs: list[torch.Tensor]) -> torch.Tensor:
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class SdpaRunsAttention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        outputs = []
        for run in ctx.layout.runs:
            table = ctx.rope[run.grid]
            q_run, k_run = apply_rope(run_view(q, run), table), apply_rope(run_view(k, run), table)
            outputs.append(from_run_view(F.scaled_dot_product_attention(q_run, k_run, run_view(v, run))))
        return cat_runs(outputs)


class TokenRopeAttention(nn.Module):
    """Base of the backends that take the whole stream at once: rotary applied per token first."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        table = ctx.token_rope()
        q = apply_rope(q.transpose(0, 1), table).transpose(0, 1).contiguous()  # (N, H, D); table over N
        k = apply_rope(k.transpose(0, 1), table).transpose(0, 1).contiguous()
        return self.attend(q, k, v.contiguous(), ctx).reshape(q.shape[0], -1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        raise NotImplementedError


class SdpaDenseAttention(TokenRopeAttention):
    def attend(self, q, k, v, ctx):
        same = ctx.sequence_of_token[:, None] == ctx.sequence_of_token[None, :]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=same)
        return out.transpose(0, 1)


class VarlenAttention(TokenRopeAttention):
    def attend(self, q, k, v, ctx):
        from torch.nn.attention.varlen import varlen_attn

        longest = max(run.seqlen for run in ctx.layout.runs)
        return varlen_attn(q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, longest, longest)


class FlashAttention(TokenRopeAttention):
    def attend(self, q, k, v, ctx):
        from flash_attn import flash_attn_varlen_func  # pyright: ignore[reportMissingImports] (optional: CUDA only)

        longest = max(run.seqlen for run in ctx.layout.runs)
        return flash_attn_varlen_func(q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, longest, longest)


class FlexAttention(TokenRopeAttention):
    """flex_attention with a document mask; block masks are cached per layout (they cost a kernel to build)."""

    def __init__(self):
        super().__init__()
        self._masks: dict[tuple[PackedLayout, str], object] = {}

    def attend(self, q, k, v, ctx):
        from torch.nn.attention.flex_attention import create_block_mask

        key = (ctx.layout, str(q.device))
        if key not in self._masks:
            if len(self._masks) > 32:
                self._masks.clear()
            ids = ctx.sequence_of_token

            def same_sequence(batch, head, q_index, kv_index):
                return ids[q_index] == ids[kv_index]

            n = q.shape[0]
            self._masks[key] = create_block_mask(same_sequence, None, None, n, n, device=q.device)
        out = compiled_flex_attention()(  # pyright: ignore[reportCallIssue] (flex_attention's overloads, one per return kind)
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            block_mask=self._masks[key],  # pyright: ignore[reportArgumentType] (the cached BlockMask)
        )
        return out[0].transpose(0, 1)


_COMPILED_FLEX = None


def compiled_flex_attention():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


BACKENDS = {
    "sdpa_runs": SdpaRunsAttention,
    "sdpa_dense": SdpaDenseAttention,
    "varlen": VarlenAttention,
    "flex": FlexAttention,
    "flash": FlashAttention,
}


def available_backends(device_type: str) -> list[str]:
    """Backends that can run (forward and backward) on a device type here."""
    names = ["sdpa_runs", "sdpa_dense"]
    if device_type == "cuda":
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            names.append("varlen")
        names.append("flex")
        if importlib.util.find_spec("flash_attn") is not None:
            names.append("flash")
    return names


def resolve_backend(name: str, device_type: str) -> str:
    """`auto` -> flash-attn when installed on CUDA, else SDPA over runs (measured fastest of torch's own on
    H200: cuDNN at head dim 72); a named backend is checked against the device."""
    available = available_backends(device_type)
    if name == "auto":
        return "flash" if "flash" in available else "sdpa_runs"
    if name not in available:
        raise ValueError(f"attention backend '{name}' is not available on {device_type} (available: {available})")
    return name


class _Projections(nn.Module):
    def __init__(self, dim: int, kv_dim: int, num_heads: int, head_dim: int, bias: bool):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(kv_dim, inner, bias=bias)
        self.v_proj = nn.Linear(kv_dim, inner, bias=bias)
        self.o_proj = nn.Linear(inner, dim, bias=bias)
        self.q_norm = RMSNorm(inner)
        self.k_norm = RMSNorm(inner)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)


class SelfAttention(_Projections):
    def __init__(self, dim: int, num_heads: int, head_dim: int, bias: bool):
        super().__init__(dim, dim, num_heads, head_dim, bias)
        self.core: nn.Module = SdpaRunsAttention()
        self.fused_qkv = False  # one matmul for q, k and v (parallelize's apply_fused_qkv)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v of x: three matmuls, or one over the three weights side by side (their parameters stay
        the three layers', so checkpoints are the same either way)."""
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if not self.fused_qkv:
            q, k, v = (layer(x) for layer in layers)
            return q, k, v
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers]) if self.q_proj.bias is not None else None
        q, k, v = F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        q = self.split_heads(self.q_norm(q))
        k = self.split_heads(self.k_norm(k))
        return self.o_proj(self.core(q, k, self.split_heads(v), ctx))


class CrossAttention(_Projections):
    """Image tokens attend to their sequence's text tokens; rotary on the queries only, as the reference.

    Works piece by piece on whatever tokens this call holds (no sequence needs to be whole)."""

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        q = self.split_heads(self.q_norm(self.q_proj(x)))
        k = self.split_heads(self.k_norm(self.k_proj(ctx.text))).transpose(1, 2)  # (B, H, text_len, D)
        v = self.split_heads(self.v_proj(ctx.text)).transpose(1, 2)
        outputs, start = [], 0
        for piece in ctx.pieces:
            tokens = q[start : start + piece.tokens]
            start += piece.tokens
            if piece.first_sequence is None:
                outputs.append(tokens.new_zeros(piece.tokens, q.shape[1] * q.shape[2]))
                continue
            sequences = slice(piece.first_sequence, piece.first_sequence + piece.count)
            table = ctx.rope[piece.grid][piece.offset : piece.offset + piece.length]
            q_piece = apply_rope(tokens.reshape(piece.count, piece.length, *q.shape[1:]).transpose(1, 2), table)
            bias = ctx.text_bias[sequences].to(q_piece.dtype) if ctx.text_bias is not None else None
            out = F.scaled_dot_product_attention(q_piece, k[sequences], v[sequences], attn_mask=bias)
            outputs.append(from_run_view(out))
        return self.o_proj(cat_runs(outputs))


def set_attention_backend(model: nn.Module, name: str, device_type: str) -> str:
    """Swap the self-attention core of every block of a model; returns the backend used."""
    resolved = resolve_backend(name, device_type)
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.core = BACKENDS[resolved]()
    return resolved
