"""Attention backends agree with each other (forward and gradients) on packed mixed-length streams."""

from __future__ import annotations

import pytest
import torch

from pixelflow.config import ModelConfig
from pixelflow.model import PackedLayout, PixelFlowTransformer
from pixelflow.model.attention import (
    BACKENDS,
    SdpaDenseAttention,
    SdpaRunsAttention,
    StreamContext,
    available_backends,
    resolve_backend,
    set_attention_backend,
)
from pixelflow.model.embeddings import rope_table
from pixelflow.model.layout import stream_pieces

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def stream(grids: list[tuple[int, int]], heads: int, head_dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    layout = PackedLayout.from_grids(grids)
    generator = torch.Generator().manual_seed(seed)
    q, k, v, upstream = (torch.randn(layout.num_tokens, heads, head_dim, generator=generator) for _ in range(4))
    ctx = StreamContext(
        layout,
        stream_pieces(layout),
        layout.sequence_of_token(device),
        layout.cu_seqlens(device),
        {grid: rope_table(grid, head_dim, device) for grid in set(layout.grids)},
    )
    tensors = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q, k, v)]
    return ctx, tensors, upstream.to(device=device, dtype=dtype).reshape(layout.num_tokens, -1)


def run(core, ctx, tensors, upstream):
    out = core(*tensors, ctx)
    grads = torch.autograd.grad((out * upstream).sum(), tensors)
    return out.float(), [g.float() for g in grads]


SQUARES = [(s, s) for s in (8, 1, 8, 2, 4, 2, 16, 1)]  # 64, 1, 64, 4, 16, 4, 256 and 1 tokens, unsorted
ASPECTS = [(4, 8), (8, 4), (4, 8), (2, 3), (1, 16), (6, 6)]  # landscape, portrait, thin and square grids


@pytest.mark.parametrize("grids", [SQUARES, ASPECTS], ids=["squares", "aspects"])
@pytest.mark.parametrize("device", DEVICES)
def test_all_available_backends_agree_on_mixed_lengths(device, grids):
    heads, head_dim = 4, 16
    low = device == "cuda"  # CUDA kernels (varlen, flash, flex) are tested in bf16 against an fp32 reference
    dtype = torch.bfloat16 if low else torch.float32
    tolerance = 3e-2 if low else 1e-5
    ctx, _, upstream = stream(grids, heads, head_dim, device, torch.float32)
    reference = run(SdpaDenseAttention(), ctx, stream(grids, heads, head_dim, device, torch.float32)[1], upstream)
    for name in available_backends(device):
        ctx, tensors, upstream_low = stream(grids, heads, head_dim, device, dtype)
        out, grads = run(BACKENDS[name](), ctx, tensors, upstream_low)
        assert (out - reference[0]).abs().max().item() <= tolerance, name
        for got, want in zip(grads, reference[1]):
            assert (got - want).abs().max().item() <= tolerance * 4, name


def test_backend_selection():
    assert resolve_backend("auto", "cpu") == "sdpa_runs"
    assert resolve_backend("sdpa_dense", "cpu") == "sdpa_dense"
    with pytest.raises(ValueError, match="'varlen' is not available on cpu"):
        resolve_backend("varlen", "cpu")
    model = PixelFlowTransformer(ModelConfig(depth=2, num_heads=2, head_dim=8, num_classes=3))
    assert all(isinstance(block.attn.core, SdpaRunsAttention) for block in model.blocks)
    assert set_attention_backend(model, "sdpa_dense", "cpu") == "sdpa_dense"
    assert all(isinstance(block.attn.core, SdpaDenseAttention) for block in model.blocks)
    assert "sdpa_dense.weight" not in model.state_dict()  # cores hold no parameters
