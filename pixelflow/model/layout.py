"""How sequences of different resolutions share one packed token stream.

A packed stream concatenates the patch tokens of many images (of any sizes and aspect ratios: rows x cols
token grids, row-major) into one (N, C) tensor. Images of equal grid sit next to each other as a `Run`, so
attention and per-sample modulation can work on a whole run at once with a plain batched view instead of a
per-sample loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Run:
    """`count` consecutive sequences, each a rows x cols token grid, starting at token `start`."""

    start: int
    count: int
    grid: tuple[int, int]  # (rows, cols)
    first_sequence: int

    @property
    def seqlen(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def end(self) -> int:
        return self.start + self.count * self.seqlen


@dataclass(frozen=True)
class PackedLayout:
    runs: tuple[Run, ...]

    @staticmethod
    def from_grids(grids: Sequence[tuple[int, int]]) -> PackedLayout:
        """Layout for sequences with the given (rows, cols) token grids, in that order."""
        runs: list[Run] = []
        start = 0
        for index, (rows, cols) in enumerate(grids):
            grid = (int(rows), int(cols))
            if min(grid) < 1:
                raise ValueError(f"token-grid sides must be positive, got {grid[0]} x {grid[1]}")
            if runs and runs[-1].grid == grid:
                last = runs[-1]
                runs[-1] = Run(last.start, last.count + 1, grid, last.first_sequence)
            else:
                runs.append(Run(start, 1, grid, index))
            start += grid[0] * grid[1]
        return PackedLayout(tuple(runs))

    @staticmethod
    def from_sides(sides: Sequence[int]) -> PackedLayout:
        """Layout for square sequences with the given token-grid sides, in that order."""
        return PackedLayout.from_grids([(side, side) for side in sides])

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [run.grid for run in self.runs for _ in range(run.count)]

    @property
    def seqlens(self) -> list[int]:
        return [run.seqlen for run in self.runs for _ in range(run.count)]

    @property
    def num_sequences(self) -> int:
        return sum(run.count for run in self.runs)

    @property
    def num_tokens(self) -> int:
        return self.runs[-1].end if self.runs else 0

    def cu_seqlens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Cumulative sequence starts (int32, length num_sequences + 1), as varlen kernels take them."""
        return torch.tensor([0, *self.seqlens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    def sequence_of_token(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """For every token, the index of the sequence it belongs to (int64, length num_tokens)."""
        lengths = torch.tensor(self.seqlens)
        index = torch.arange(self.num_sequences).repeat_interleave(lengths)
        return index.to(device, non_blocking=True)


@dataclass(frozen=True)
class Piece:
    """A stretch of the stream: `count` sequences from `first_sequence` on, `length` tokens of each,
    starting `offset` tokens into each (a whole run has offset 0 and length rows*cols). A rank of a
    sequence-parallel group holds a slice of the stream, whose first and last pieces may be partial;
    `first_sequence` None marks padding."""

    first_sequence: int | None
    count: int
    length: int
    offset: int
    grid: tuple[int, int]  # (rows, cols) of its sequences; (0, 0) for padding

    @property
    def tokens(self) -> int:
        return self.count * self.length


def stream_pieces(layout: PackedLayout, start: int = 0, stop: int | None = None) -> tuple[Piece, ...]:
    """Tokens [start, stop) of the stream as pieces; past the end of the stream is padding."""
    stop = layout.num_tokens if stop is None else stop
    pieces: list[Piece] = []
    for run in layout.runs:
        low, high = max(start, run.start), min(stop, run.end)
        if low >= high:
            continue
        first, last = (low - run.start) // run.seqlen, (high - 1 - run.start) // run.seqlen
        head_offset = (low - run.start) % run.seqlen
        if first == last:  # within one sequence
            pieces.append(Piece(run.first_sequence + first, 1, high - low, head_offset, run.grid))
            continue
        if head_offset:
            pieces.append(Piece(run.first_sequence + first, 1, run.seqlen - head_offset, head_offset, run.grid))
            first += 1
        tail = (high - run.start) % run.seqlen
        whole = last - first + (0 if tail else 1)
        if whole:
            pieces.append(Piece(run.first_sequence + first, whole, run.seqlen, 0, run.grid))
        if tail:
            pieces.append(Piece(run.first_sequence + last, 1, tail, 0, run.grid))
    if stop > max(start, layout.num_tokens):
        pieces.append(Piece(None, 1, stop - max(start, layout.num_tokens), 0, (0, 0)))
    return tuple(pieces)


def expand_to_tokens(values: torch.Tensor, pieces: tuple[Piece, ...]) -> torch.Tensor:
    """(B, k) per-sequence values -> per-token values for the tokens `pieces` describe (zeros for padding).

    Built from per-piece broadcasts rather than an index gather: the backward is then a plain sum over each
    sequence's tokens instead of atomic scatter-adds of every token into a handful of rows.
    """
    width = values.shape[-1]
    parts = []
    for piece in pieces:
        if piece.first_sequence is None:
            parts.append(values.new_zeros(piece.tokens, width))
            continue
        rows = values[piece.first_sequence : piece.first_sequence + piece.count, None, :]
        parts.append(rows.expand(piece.count, piece.length, width).reshape(piece.tokens, width))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) images -> (B * H/p * W/p, C * p * p) tokens, row-major, each token ordered (c, py, px)."""
    b, c, h, w = images.shape
    p = patch_size
    grid = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(b * (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, count: int, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Inverse of patchify for `count` images of rows x cols tokens each."""
    (rows, cols), p = grid, patch_size
    c = tokens.shape[-1] // (p * p)
    patches = tokens.reshape(count, rows, cols, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(count, c, rows * p, cols * p)
