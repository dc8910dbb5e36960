"""How sequences of different resolutions share one packed token stream.

A packed stream concatenates the patch tokens of many square images (of any sizes) into one (N, C) tensor.
Images of equal size sit next to each other as a `Run`, so attention and per-sample modulation can work
on a whole run at once with a plain batched view instead of a per-sample loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Run:
    """`count` consecutive sequences, each a side x side token grid, starting at token `start`."""

    start: int
    count: int
    side: int
    first_sequence: int

    @property
    def seqlen(self) -> int:
        return self.side * self.side

    @property
    def end(self) -> int:
        return self.start + self.count * self.seqlen


@dataclass(frozen=True)
class PackedLayout:
    runs: tuple[Run, ...]

    @staticmethod
    def from_sides(sides: Sequence[int]) -> PackedLayout:
        """Layout for sequences with the given token-grid sides, in that order."""
        runs: list[Run] = []
        start = 0
        for index, side in enumerate(sides):
            side = int(side)
            if side < 1:
                raise ValueError(f"token-grid side must be positive, got {side}")
            if runs and runs[-1].side == side:
                last = runs[-1]
                runs[-1] = Run(last.start, last.count + 1, side, last.first_sequence)
            else:
                runs.append(Run(start, 1, side, index))
            start += side * side
        return PackedLayout(tuple(runs))

    @property
    def sides(self) -> list[int]:
        return [run.side for run in self.runs for _ in range(run.count)]

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


def expand_to_tokens(values: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """(B, k) per-sequence values -> (N, k) per-token values.

    Built from per-run broadcasts rather than an index gather: the backward is then a plain sum over each
    sequence's tokens instead of atomic scatter-adds of every token into a handful of rows.
    """
    pieces = [
        values[run.first_sequence : run.first_sequence + run.count, None, :]
        .expand(run.count, run.seqlen, values.shape[-1])
        .reshape(run.count * run.seqlen, values.shape[-1])
        for run in layout.runs
    ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) images -> (B * H/p * W/p, C * p * p) tokens, row-major, each token ordered (c, py, px)."""
    b, c, h, w = images.shape
    p = patch_size
    grid = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(b * (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, count: int, side: int, patch_size: int) -> torch.Tensor:
    """Inverse of patchify for `count` square images of side x side tokens."""
    p = patch_size
    c = tokens.shape[-1] // (p * p)
    grid = tokens.reshape(count, side, side, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(count, c, side * p, side * p)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor without making the host wait for the device (pinned, non-blocking)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
