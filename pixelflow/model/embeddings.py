"""Conditioning embeddings (timestep, token-grid size) and 2D rotary position tables.

Both follow the public reference implementation exactly so converted checkpoints compute the same thing:
sinusoidal features with [cos, sin] order and frequency exponent scaled by 1/(half - 1); RoPE with the first
half of each head encoding the column and the second half the row, frequencies interleaved in pairs.

The reference conditions on the side of a square grid. A rows x cols grid gives the cosines of its rows and
the sines of its cols at the same frequencies: for a square, exactly the reference's features of its side
(so square models and converted checkpoints are unchanged, with no new weights); otherwise both sides, in
order, stay recoverable from the features (portrait and landscape differ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SINUSOID_CHANNELS = 256


def sinusoidal_features(values: torch.Tensor, channels: int = SINUSOID_CHANNELS, max_period: float = 10000.0):
    """(B,) scalars v -> (B, channels) float32 features [cos(v f), sin(v f)] with f_i = max_period^(-i/(half-1));
    (B, 2) pairs (a, b), a token grid's (rows, cols) -> [cos(a f), sin(b f)] (a square's equal its side's)."""
    half = channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / (half - 1)
    pairs = values.float().reshape(len(values), -1)
    frequencies = torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(pairs[:, :1] * frequencies), torch.sin(pairs[:, -1:] * frequencies)], dim=-1)


class ScalarEmbedder(nn.Module):
    """Embeds a scalar (diffusion timestep) or a token grid's (rows, cols) through sinusoids and a two-layer
    MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(SINUSOID_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_features(values).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


def rope_table(grid: tuple[int, int], head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows*cols, head_dim, 2) float32 [cos, sin] table for a row-major rows x cols token grid."""
    quarter = head_dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32)[:quarter] / (head_dim // 2)))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32), indexing="ij"
    )
    angles = torch.cat(
        [torch.outer(cols.reshape(-1), freqs), torch.outer(rows.reshape(-1), freqs)], dim=1
    ).repeat_interleave(2, dim=1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(device)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (..., L, head_dim) by a (L, head_dim, 2) table, in float32."""
    cos, sin = table.unbind(-1)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
