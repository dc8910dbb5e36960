"""Ulysses sequence parallelism over the packed stream.

The ranks of an SP group hold equal slices of one packed micro-batch's tokens. Around the attention kernel,
an all-to-all turns token slices with all heads into the whole stream with 1/sp of the heads; the kernel
then attends over whole sequences with the global layout (any mix of lengths), and a second all-to-all
turns the result back. Projections, norms and MLPs never see the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from pixelflow.model.attention import StreamContext
from pixelflow.model.layout import PackedLayout, Piece, stream_pieces


def tokens_to_heads(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """(n_local, H, D) on each rank -> (size * n_local, H / size, D): every token, this rank's heads."""
    n, heads, dim = x.shape
    send = x.reshape(n, size, heads // size, dim).transpose(0, 1).contiguous()
    received = funcol.all_to_all_single_autograd(send, None, None, group)
    return received.reshape(size * n, heads // size, dim)


def heads_to_tokens(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """(size * n_local, H / size * D) -> (n_local, H * D): this rank's tokens, every head."""
    total, width = x.shape
    n = total // size
    send = x.reshape(size, n, width).contiguous()
    received = funcol.all_to_all_single_autograd(send, None, None, group)
    return received.transpose(0, 1).reshape(n, size * width)


class UlyssesAttention(nn.Module):
    """Wraps an attention core (the one the model had) so it runs across an SP group."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup, size: int):
        super().__init__()
        self.inner, self.group, self.size = inner, group, size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        total = ctx.layout.num_tokens
        q, k, v = (tokens_to_heads(t, self.group, self.size) for t in (q, k, v))
        out = self.inner(q[:total], k[:total], v[:total], ctx)
        padding = q.shape[0] - total
        if padding:
            out = torch.cat([out, out.new_zeros(padding, out.shape[1])])
        return heads_to_tokens(out, self.group, self.size)


@dataclass(frozen=True)
class StreamShard:
    """What one SP rank runs of a packed micro-batch: its token and target rows, its range of the stream
    (None: the whole stream, no SP), the pieces of sequences it holds, and how many of its rows are real."""

    tokens: torch.Tensor
    targets: torch.Tensor
    token_range: tuple[int, int] | None
    pieces: tuple[Piece, ...] | None
    real: int


def shard_stream(
    tokens: torch.Tensor, targets: torch.Tensor, layout: PackedLayout, sp_rank: int, sp_size: int
) -> StreamShard:
    """This SP rank's equal slice of a packed stream (zero rows past its end); the stream itself when sp is 1."""
    if sp_size == 1:
        return StreamShard(tokens, targets, None, None, tokens.shape[0])
    start, stop = sp_slice(layout.num_tokens, sp_rank, sp_size)
    real = max(0, min(stop, layout.num_tokens) - start)
    pieces = stream_pieces(layout, start, stop)
    return StreamShard(slice_rows(tokens, start, stop), slice_rows(targets, start, stop), (start, stop), pieces, real)


def slice_rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor, zero rows past its end."""
    part = tensor[start:stop]
    missing = stop - start - part.shape[0]
    return torch.cat([part, part.new_zeros(missing, *part.shape[1:])]) if missing else part


def sp_slice(num_tokens: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
    """The token range [start, stop) an SP rank holds: equal slices, padding past the end of the stream."""
    per_rank = -(-num_tokens // sp_size)
    return sp_rank * per_rank, (sp_rank + 1) * per_rank
