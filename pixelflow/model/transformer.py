"""The PixelFlow transformer: plain torch, no data, training or distributed code.

It computes what the public reference `PixelFlowModel` computes (AdaLN-Zero modulation from timestep +
class + token-grid-size embeddings, 2D RoPE, q/k RMSNorm, GELU-tanh MLP), on one packed stream of tokens
from images of any mix of resolutions. Token channels are ordered (c, py, px) on input and output.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from pixelflow.config import ModelConfig
from pixelflow.devices import to_device
from pixelflow.model.attention import CrossAttention, RMSNorm, SelfAttention, StreamContext
from pixelflow.model.embeddings import ScalarEmbedder, rope_table
from pixelflow.model.layout import PackedLayout, expand_to_tokens, patchify, stream_pieces, unpatchify


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in float32, as the reference computes it, returned in x's dtype: under bf16
    autocast the modulation projection's output is bf16, and 1 + scale rounded to bf16 keeps only 8 bits of
    a small scale."""
    return (x.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


class FeedForward(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.num_heads * cfg.head_dim
        self.modulation = nn.Linear(dim, 6 * dim)
        self.attn_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, cfg.num_heads, cfg.head_dim, bias=cfg.attention_bias)
        if cfg.text_dim:
            self.cross_norm = RMSNorm(dim)
            self.cross_attn = CrossAttention(dim, cfg.text_dim, cfg.num_heads, cfg.head_dim, bias=cfg.attention_bias)
        else:
            self.cross_norm, self.cross_attn = None, None
        self.mlp_norm = RMSNorm(dim)
        self.mlp = FeedForward(dim, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor, silu_cond: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        per_token = expand_to_tokens(self.modulation(silu_cond), ctx.pieces)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = per_token.chunk(6, dim=-1)
        x = x + gate_attn * self.attn(modulate(self.attn_norm(x), shift_attn, scale_attn), ctx)
        if self.cross_attn is not None and self.cross_norm is not None:  # text models have both
            x = x + self.cross_attn(self.cross_norm(x), ctx)
        return x + gate_mlp * self.mlp(modulate(self.mlp_norm(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, out_channels)

    def forward(self, x: torch.Tensor, silu_cond: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        shift, scale = expand_to_tokens(self.modulation(silu_cond), ctx.pieces).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


class PixelFlowTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.num_heads * cfg.head_dim
        token_channels = cfg.in_channels * cfg.patch_size**2
        self.patch_embed = nn.Linear(token_channels, dim)
        self.time_embed = ScalarEmbedder(dim)
        self.size_embed = ScalarEmbedder(dim)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, dim) if cfg.num_classes > 0 else None
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.depth)])
        self.final = FinalLayer(dim, token_channels)
        self._rope_cache: dict[tuple[tuple[int, int], str], torch.Tensor] = {}
        self._context_cache: dict[tuple, tuple[StreamContext, torch.Tensor]] = {}
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        """Label of the unconditional (CFG) embedding row."""
        return self.cfg.num_classes

    def reset_parameters(self) -> None:
        """The reference initialisation: xavier linears, N(0, 0.02) embedders, zeroed modulation and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in (self.time_embed, self.size_embed):
            nn.init.normal_(embedder.linear_1.weight, std=0.02)
            nn.init.normal_(embedder.linear_2.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        layers: list[nn.Linear] = [block.modulation for block in self.blocks]  # type: ignore[misc]
        for layer in [*layers, self.final.modulation, self.final.proj]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def stream_context(
        self, layout: PackedLayout, device: torch.device, token_range: tuple[int, int] | None = None
    ) -> tuple[StreamContext, torch.Tensor]:
        """(context, per-sequence token grids (B, 2)) for a layout and the token range held, cached: repeated
        layouts (every Euler step, most training steps) cost no host work and no host-to-device copy."""
        key = (layout, token_range, str(device))
        if key not in self._context_cache:
            if len(self._context_cache) >= 64:
                self._context_cache.clear()
            rope = {}
            for grid in {run.grid for run in layout.runs}:
                if (grid, str(device)) not in self._rope_cache:
                    self._rope_cache[(grid, str(device))] = rope_table(grid, self.cfg.head_dim, device)
                rope[grid] = self._rope_cache[(grid, str(device))]
            ctx = StreamContext(
                layout,
                stream_pieces(layout, *(token_range or (0, layout.num_tokens))),
                to_device(layout.sequence_of_token(), device),
                to_device(layout.cu_seqlens(), device),
                rope,
            )
            grids = to_device(torch.tensor(layout.grids, dtype=torch.float32), device)
            self._context_cache[key] = (ctx, grids)
        return self._context_cache[key]

    def forward(
        self,
        tokens: torch.Tensor,
        layout: PackedLayout,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        token_range: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Velocity for a packed stream (or the slice [start, stop) of it given in `token_range`).

        tokens: (N, C*p*p) patch tokens of all sequences back to back, as `layout` describes them; under
        sequence parallelism only the slice this rank holds (stop - start tokens, padding past the end).
        timesteps: (B,) global timesteps on the 0..num_train_timesteps scale, one per sequence.
        labels: (B,) class ids, `null_class` for unconditional; None for a model without classes.
        text, text_mask: (B, L, text_dim) text-encoder tokens and (B, L) 1 = real token, 0 = padding, for a
        model with cross-attention.
        """
        ctx, grids = self.stream_context(layout, tokens.device, token_range)
        if text is not None:
            bias = None if text_mask is None else ((1.0 - text_mask.float()) * -10000.0)[:, None, None, :]
            ctx = dataclasses.replace(ctx, text=text, text_bias=bias)
        cond = self.time_embed(timesteps) + self.size_embed(grids)
        if self.class_embed is not None:
            cond = cond + self.class_embed(labels)
        silu_cond = F.silu(cond)
        x = self.patch_embed(tokens)
        for block in self.blocks:
            x = block(x, silu_cond, ctx)
        return self.final(x, silu_cond, ctx)

    def forward_images(
        self,
        images: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for a plain batch of equal-size images (B, C, H, W), as the sampler uses it."""
        patch = self.cfg.patch_size
        count, grid = images.shape[0], (images.shape[-2] // patch, images.shape[-1] // patch)
        layout = PackedLayout.from_grids([grid] * count)
        out = self.forward(patchify(images, patch), layout, timesteps, labels, text, text_mask)
        return unpatchify(out, count, grid, patch)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
