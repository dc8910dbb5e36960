"""The transformer: shapes at every stage, packed == per-sample, reference-faithful pieces."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pixelflow.config import ModelConfig
from pixelflow.model import PackedLayout, PixelFlowTransformer, count_parameters, patchify, unpatchify
from pixelflow.model.embeddings import apply_rope, rope_table, sinusoidal_features

TINY = ModelConfig(depth=2, num_heads=2, head_dim=16, patch_size=4, num_classes=10)


def randomised(cfg: ModelConfig = TINY, seed: int = 0) -> PixelFlowTransformer:
    """A model with every weight random (the real init zeroes the output, which would hide mistakes)."""
    torch.manual_seed(seed)
    model = PixelFlowTransformer(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def test_xl_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = PixelFlowTransformer(ModelConfig())
    assert count_parameters(model) == 676_611_120  # 676.6M


def test_fresh_model_predicts_zero_velocity():
    model = PixelFlowTransformer(TINY)
    out = model.forward_images(torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0]), torch.tensor([1, 10]))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("stage_pixels", [4, 8, 16, 32])  # the four stages of a 32-pixel, 4-stage cascade
def test_forward_shapes_for_every_stage(stage_pixels):
    model = randomised()
    images = torch.randn(3, 3, stage_pixels, stage_pixels)
    out = model.forward_images(images, torch.rand(3) * 999, torch.tensor([0, 5, 10]))
    assert out.shape == images.shape
    tokens = patchify(images, 4)
    layout = PackedLayout.from_sides([stage_pixels // 4] * 3)
    assert model(tokens, layout, torch.rand(3) * 999, torch.tensor([0, 5, 10])).shape == tokens.shape


@pytest.mark.parametrize(
    "grids", [[(s, s) for s in (4, 1, 4, 2, 2, 8, 1, 8)], [(2, 3), (3, 2), (4, 4), (1, 6), (2, 3)]]
)
def test_packed_stream_equals_per_sample_forward(grids):
    """Squares of several sides, then grids of several aspects (deliberately unsorted)."""
    model = randomised()
    images = [torch.randn(1, 3, 4 * rows, 4 * cols) for rows, cols in grids]
    timesteps = torch.rand(len(grids)) * 999
    labels = torch.randint(0, 11, (len(grids),))
    layout = PackedLayout.from_grids(grids)
    with torch.no_grad():
        packed = model(torch.cat([patchify(x, 4) for x in images]), layout, timesteps, labels)
        alone = [model.forward_images(x, timesteps[i : i + 1], labels[i : i + 1]) for i, x in enumerate(images)]
    start = 0
    for i, (rows, cols) in enumerate(grids):
        piece = unpatchify(packed[start : start + rows * cols], 1, (rows, cols), 4)
        # equal up to rounding: relative to the outputs' magnitude (measured: at most 2.2e-6 over 40 seeds)
        assert (piece - alone[i]).abs().max().item() <= 1e-5 * alone[i].abs().max().item()
        start += rows * cols
    assert start == packed.shape[0]


def test_portrait_and_landscape_are_conditioned_apart_and_a_square_as_its_side():
    features = sinusoidal_features(torch.tensor([[2.0, 3.0], [3.0, 2.0], [5.0, 5.0]]))
    assert not torch.allclose(features[0], features[1])
    assert torch.equal(features[2], sinusoidal_features(torch.tensor([5.0]))[0])  # the reference's, bit for bit
    model = randomised()
    with torch.no_grad():
        landscape = model.forward_images(torch.ones(1, 3, 8, 12), torch.tensor([500.0]), torch.tensor([1]))
        portrait = model.forward_images(torch.ones(1, 3, 12, 8), torch.tensor([500.0]), torch.tensor([1]))
    assert landscape.shape == (1, 3, 8, 12) and portrait.shape == (1, 3, 12, 8)


def test_layout_groups_equal_grids_into_runs():
    layout = PackedLayout.from_grids([(2, 2), (2, 2), (1, 1), (2, 2), (1, 4)])
    assert [(r.start, r.count, r.grid) for r in layout.runs] == [
        (0, 2, (2, 2)),
        (8, 1, (1, 1)),
        (9, 1, (2, 2)),
        (13, 1, (1, 4)),
    ]
    layout = PackedLayout.from_sides([2, 2, 1, 2])
    assert layout.seqlens == [4, 4, 1, 4]
    assert layout.cu_seqlens().tolist() == [0, 4, 8, 9, 13]
    assert layout.sequence_of_token().tolist() == [0] * 4 + [1] * 4 + [2] + [3] * 4


def test_patchify_round_trip_and_channel_order():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tokens = patchify(images, 4)
    assert tokens.shape == (2 * 2 * 2, 3 * 16)
    assert torch.equal(tokens[0, :16], images[0, 0, :4, :4].reshape(-1))  # token 0: channel 0 patch first
    assert torch.equal(tokens[1, 16:32], images[0, 1, :4, 4:8].reshape(-1))  # token 1 is the patch to the right
    assert torch.equal(unpatchify(tokens, 2, (2, 2), 4), images)
    wide = torch.arange(3 * 8 * 12, dtype=torch.float32).reshape(1, 3, 8, 12)
    assert torch.equal(unpatchify(patchify(wide, 4), 1, (2, 3), 4), wide)


def test_sinusoidal_features_follow_the_reference_formula():
    values = torch.tensor([0.0, 3.0, 700.0])
    features = sinusoidal_features(values)
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(128) / 127)
    assert torch.allclose(features[:, :128], torch.cos(values[:, None] * frequencies), atol=1e-6)
    assert torch.allclose(features[:, 128:], torch.sin(values[:, None] * frequencies), atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    side, head_dim = 6, 16
    table = rope_table((side, side), head_dim)
    torch.manual_seed(0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(qpos: tuple[int, int], kpos: tuple[int, int]) -> float:
        rows = torch.stack([q, k])[:, None, :].expand(2, side * side, head_dim)
        rotated = apply_rope(rows, table)
        return float(rotated[0, qpos[0] * side + qpos[1]] @ rotated[1, kpos[0] * side + kpos[1]])

    assert score((0, 0), (2, 3)) == pytest.approx(score((3, 2), (5, 5)), abs=1e-5)
    assert score((1, 4), (1, 1)) == pytest.approx(score((4, 5), (4, 2)), abs=1e-5)
    assert score((0, 0), (0, 1)) != pytest.approx(score((0, 0), (1, 0)), abs=1e-3)  # rows and columns differ
    vectors = torch.randn(side * side, head_dim)
    assert torch.allclose(apply_rope(vectors, table).norm(dim=-1), vectors.norm(dim=-1), atol=1e-5)  # a rotation


def test_a_rows_x_cols_rope_table_holds_the_square_tables_positions():
    square, wide = rope_table((5, 5), 16), rope_table((2, 5), 16)
    assert torch.equal(wide, square[: 2 * 5])  # row-major: the first two rows of the square
    tall = rope_table((5, 2), 16)
    assert torch.equal(tall, square.reshape(5, 5, 16, 2)[:, :2].reshape(10, 16, 2))


def test_rope_first_half_encodes_columns():
    table = rope_table((4, 4), 16)
    cos = table[..., 0]
    same_column = cos[[0, 4, 8, 12]]  # tokens (row r, column 0)
    assert torch.allclose(same_column[:, :8], same_column[0, :8].expand(4, 8))
    assert not torch.allclose(same_column[:, 8:], same_column[0, 8:].expand(4, 8))


def test_cross_attention_on_a_slice_of_the_stream_equals_that_slice_of_the_whole():
    """Text conditioning under sequence parallelism: a rank's token slice needs no other rank's tokens."""
    model = randomised(ModelConfig(depth=1, num_heads=2, head_dim=8, num_classes=0, text_dim=6))
    block = model.blocks[0]
    layout = PackedLayout.from_sides([4, 2, 2, 4])
    x = torch.randn(layout.num_tokens, 16)
    text, mask = torch.randn(4, 5, 6), torch.tensor([[1, 1, 0, 0, 0]] * 2 + [[1] * 5] * 2)
    whole_ctx, _ = model.stream_context(layout, torch.device("cpu"))
    bias = ((1.0 - mask.float()) * -10000.0)[:, None, None, :]
    whole = block.cross_attn(x, dataclasses.replace(whole_ctx, text=text, text_bias=bias))
    for start, stop in [(0, 11), (11, 22), (5, 37), (30, 44)]:
        ctx, _ = model.stream_context(layout, torch.device("cpu"), (start, stop))
        piece = block.cross_attn(
            torch.cat([x[start:stop], torch.zeros(max(0, stop - 40), 16)]),
            dataclasses.replace(ctx, text=text, text_bias=bias),
        )
        assert torch.allclose(piece[: min(stop, 40) - start], whole[start:stop], atol=1e-6)


def test_modulation_runs_in_float32_whatever_the_input_dtype():
    """1 + scale is formed in float32 (the reference's), not rounded to bf16 first."""
    from pixelflow.model.transformer import modulate

    x = torch.full((1, 4), 3.0, dtype=torch.bfloat16)
    scale = torch.full((1, 4), 2.0**-9, dtype=torch.bfloat16)  # 1 + 2^-9 rounds to 1 in bf16
    shift = -x  # what survives is x * scale: lost entirely when 1 + scale is rounded first
    exact = (x.double() * (1 + scale.double()) + shift.double()).to(torch.bfloat16)
    assert exact.abs().min() > 0
    assert torch.equal(modulate(x, shift, scale), exact) and modulate(x, shift, scale).dtype == torch.bfloat16
    assert not torch.equal(x * (1 + scale) + shift, exact)  # the bf16 rounding this avoids
    x32 = torch.randn(3, 8)
    assert modulate(x32, shift.float()[:, :1], scale.float()[:, :1]).dtype == torch.float32
