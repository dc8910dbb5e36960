"""Conditioning embeddings (timestep, token-grid size) and 2D rotary position tables.

Both follow the public reference implementation exactly so converted checkpoints compute the same thing:
sinusoidal features with [cos, sin] order and frequency exponent scaled by 1/(half - 1); RoPE with the first
half of each head encoding the column and the second half the row, frequencies interleaved in pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SINUSOID_CHANNELS = 256


def sinusoidal_features(values: torch.Tensor, channels: int = SINUSOID_CHANNELS, max_period: float = 10000.0):
    """(B,) scalars -> (B, channels) float32 features [cos(v f), sin(v f)] with f_i = max_period^(-i/(half-1))."""
    half = channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / (half - 1)
    angles = values.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ScalarEmbedder(nn.Module):
    """Embeds a scalar (diffusion timestep or token-grid side) through sinusoids and a two-layer MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(SINUSOID_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_features(values).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


def rope_table(side: int, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(side*side, head_dim, 2) float32 [cos, sin] table for a row-major side x side token grid."""
    quarter = head_dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32)[:quarter] / (head_dim // 2)))
    coords = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
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
