"""Cascade maths: schedule numbers, training pairs by hand, block noise, sampler consistency."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pixelflow.cascade import (
    CascadeSchedule,
    block_noise,
    build_training_batch,
    cfg_scales,
    default_cfg_ramp,
    double,
    halve,
    per_sequence_mse,
    renoise_scale,
    sample,
    sample_seed,
    stage_pair,
    stage_time_grid,
)
from pixelflow.model import PackedLayout, unpatchify
from pixelflow.model.layout import stream_pieces


def test_four_stage_windows_and_timestep_ranges_match_the_reference_scheduler():
    schedule = CascadeSchedule.build(4)
    # PixelFlowScheduler(1000, 4): start_t / end_t / Timesteps_per_stage[s][0], [-1] of the reference code.
    assert schedule.original_start == (0.0, 0.25, 0.5, 0.75)
    assert schedule.start == pytest.approx((0.0, 1 / 7, 1 / 3, 0.6), abs=1e-12)
    assert schedule.end == (0.25, 0.5, 0.75, 1.0)
    assert schedule.timestep_start == (0.0, 175.0, 426.0, 719.0)
    assert schedule.timestep_end == (175.0, 426.0, 719.0, 999.0)
    tau = torch.tensor([0.0, 0.5, 0.999], dtype=torch.float64)
    assert schedule.timestep(0, tau).tolist() == pytest.approx([0.0, 87.5, 174.825])  # linspace(0,175,1001)[:-1]
    assert schedule.timestep(3, tau).tolist() == pytest.approx([719.0, 719 + 280 * 500 / 999, 999.0])


def test_renoise_rescale_is_the_papers_formula():
    gamma = -1 / 3
    for t0 in (0.25, 0.5, 0.75):
        assert renoise_scale(t0, gamma) == pytest.approx(1 / (2 * (1 - t0) + t0))  # sqrt(1 - 1/gamma) = 2


def test_stage_sizes():
    schedule = CascadeSchedule.build(4)
    assert [schedule.side(256, s) for s in range(4)] == [32, 64, 128, 256]


def test_halving_is_bilinear_half_size_and_doubling_is_nearest():
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(halve(x), F.interpolate(x, size=(8, 8), mode="bilinear"), atol=1e-6)
    assert torch.equal(double(x), F.interpolate(x, scale_factor=2, mode="nearest"))


IMAGE = torch.tensor([[255, 255, 0, 0], [255, 255, 0, 0], [0, 0, 255, 255], [0, 0, 255, 0]], dtype=torch.uint8)


def test_training_pairs_match_hand_computed_values():
    """Two stages, 4x4 one-channel image, patch 1. In [-1, 1] the image is
    [[1,1,-1,-1],[1,1,-1,-1],[-1,-1,1,1],[-1,-1,1,-1]]; its 2x2 means are [[1,-1],[-1,1/2]].
    Stage 1 (4x4): t_start = 1/3, t_end = 1; stage 0 (2x2): t_start = 0, t_end = 1/2."""
    schedule = CascadeSchedule.build(2)
    assert schedule.start == pytest.approx((0.0, 1 / 3)) and schedule.end == (0.5, 1.0)
    images = IMAGE.expand(2, 1, 4, 4).clone()
    batch = build_training_batch(images, torch.tensor([3, 4]), [0, 1], schedule, 1, seed=7, step=2, sample_ids=[10, 11])

    # Each sample's own draws: its generator, seeded by (seed, step, sample id), gives noise then time index.
    def draws(sample_id, side):
        replay = torch.Generator().manual_seed(sample_seed(7, 2, sample_id))
        return torch.randn(1, 1, side, side, generator=replay), torch.randint(0, 1000, (1,), generator=replay)

    noise_top, index_top = draws(11, 4)
    noise_low, index_low = draws(10, 2)

    end_top = torch.tensor([[1.0, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, -1]])
    start_top = torch.tensor([[1.0, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 0.5, 0.5], [-1, -1, 0.5, 0.5]])
    end_top_t = end_top  # t_end = 1: no noise left at the end of the top stage
    start_top_t = start_top / 3 + (2 / 3) * noise_top[0, 0]
    tau_top = index_top.item() / 1000
    end_low_t = 0.5 * torch.tensor([[1.0, -1], [-1, 0.5]]) + 0.5 * noise_low[0, 0]
    start_low_t = noise_low[0, 0]  # t_start = 0: the lowest stage starts from pure noise
    tau_low = index_low.item() / 1000

    assert batch.layout == PackedLayout.from_sides([4, 2])  # highest stage first
    assert batch.order == [1, 0] and batch.stages.tolist() == [1, 0] and batch.labels.tolist() == [4, 3]
    x_top, x_low = unpatchify(batch.tokens[:16], 1, (4, 4), 1)[0, 0], unpatchify(batch.tokens[16:], 1, (2, 2), 1)[0, 0]
    v_top, v_low = (
        unpatchify(batch.targets[:16], 1, (4, 4), 1)[0, 0],
        unpatchify(batch.targets[16:], 1, (2, 2), 1)[0, 0],
    )
    assert torch.allclose(v_top, end_top_t - start_top_t, atol=1e-6)
    assert torch.allclose(x_top, tau_top * end_top_t + (1 - tau_top) * start_top_t, atol=1e-6)
    assert torch.allclose(v_low, end_low_t - start_low_t, atol=1e-6)
    assert torch.allclose(x_low, tau_low * end_low_t + (1 - tau_low) * start_low_t, atol=1e-6)
    assert batch.timesteps.tolist() == pytest.approx([428 + 571 * tau_top * 1000 / 999, 428 * tau_low], abs=1e-3)


def test_label_dropout_uses_the_null_class_at_the_configured_rate():
    schedule = CascadeSchedule.build(2)
    images = torch.zeros(4000, 1, 4, 4, dtype=torch.uint8)
    labels = torch.full((4000,), 5)
    batch = build_training_batch(
        images,
        labels,
        [1] * 4000,
        schedule,
        1,
        seed=0,
        step=1,
        sample_ids=range(4000),
        class_dropout=0.1,
        null_class=10,
    )
    dropped = (batch.labels == 10).float().mean().item()
    assert set(batch.labels.tolist()) == {5, 10}
    assert dropped == pytest.approx(0.1, abs=0.015)


def test_per_sequence_mse():
    layout = PackedLayout.from_sides([2, 1, 1])
    prediction, target = torch.randn(6, 3), torch.randn(6, 3)
    expected = [((prediction[a:b] - target[a:b]) ** 2).mean() for a, b in [(0, 4), (4, 5), (5, 6)]]
    assert torch.allclose(per_sequence_mse(prediction, target, layout), torch.stack(expected))


def test_sequence_parallel_shares_of_the_loss_add_up():
    layout = PackedLayout.from_sides([4, 2, 4, 1, 2])  # 16 + 4 + 16 + 1 + 4 = 41 tokens
    prediction, target = torch.randn(41, 3), torch.randn(41, 3)
    whole = per_sequence_mse(prediction, target, layout)
    for ranks in (2, 3, 4):
        size = -(-41 // ranks)
        shares = []
        for rank in range(ranks):
            start, stop = rank * size, (rank + 1) * size
            pad = stop - min(stop, 41)
            local = [torch.cat([t[start:stop], torch.zeros(pad, 3)]) for t in (prediction, target)]
            shares.append(per_sequence_mse(*local, layout, stream_pieces(layout, start, stop)))
        assert torch.allclose(sum(shares), whole, atol=1e-6)


def test_block_noise_covariance_within_two_percent():
    gamma = -1 / 3
    noise = block_noise((64, 4, 128, 128), gamma, torch.Generator().manual_seed(0), "cpu")
    blocks = noise.reshape(64, 4, 64, 2, 64, 2).permute(0, 1, 2, 4, 3, 5).reshape(-1, 4)
    empirical = blocks.T @ blocks / blocks.shape[0]
    target = (1 - gamma) * torch.eye(4) + gamma * torch.ones(4, 4)
    assert ((empirical - target).abs() <= 0.02 * target.abs()).all(), empirical
    across = (noise[:, :, :, 1:-1:2] * noise[:, :, :, 2::2]).mean()  # horizontal neighbours in different blocks
    assert abs(across.item()) < 0.01


def test_cfg_ramp():
    assert default_cfg_ramp(4) == pytest.approx([0, 1 / 6, 2 / 3, 1])
    assert cfg_scales(2.4, default_cfg_ramp(4)) == pytest.approx([1.0, 1 + 1.4 / 6, 1 + 1.4 * 2 / 3, 2.4])
    assert cfg_scales(0.0, default_cfg_ramp(4)) == [1.0] * 4  # 0 = guidance off, as the reference
    assert default_cfg_ramp(3) == [0.0, 0.5, 1.0]


def test_time_grid_matches_reference_set_timesteps():
    schedule = CascadeSchedule.build(4)
    assert stage_time_grid(schedule, 1, 4).tolist() == pytest.approx([0.0, 0.333, 0.666, 0.999, 1.0])
    shifted = stage_time_grid(schedule, 1, 3, shift=2.0)  # t / (shift + (1 - shift) t)
    assert shifted.tolist() == pytest.approx([0.0, 0.4995 / (2 - 0.4995), 0.999 / (2 - 0.999), 1.0])


def exact_velocity(target: torch.Tensor, schedule: CascadeSchedule, resolution: int, tau_scale: float = 1.0):
    """The true velocity field of a one-image dataset, inverted from the model inputs the sampler gives
    (tau_scale: the factor by which the solver's tau was scaled before becoming a model timestep)."""

    def velocity(x, timesteps, labels):
        stage = [schedule.side(resolution, s) for s in range(schedule.stages)].index(x.shape[-1])
        end, start = stage_pair(target, stage, schedule)
        steps = schedule.num_train_timesteps
        denominator = steps - 1 if stage == schedule.stages - 1 else steps
        span = schedule.timestep_end[stage] - schedule.timestep_start[stage]
        tau = ((timesteps[0] - schedule.timestep_start[stage]) / span * denominator / steps).item() / tau_scale
        t_end, t_start = schedule.end[stage], schedule.start[stage]
        noise = (x - tau * t_end * end - (1 - tau) * t_start * start) / (tau * (1 - t_end) + (1 - tau) * (1 - t_start))
        return t_end * end - t_start * start + (t_start - t_end) * noise

    return velocity


@pytest.mark.parametrize("stages", [2, 4])
def test_sampler_follows_the_training_paths_exactly(stages):
    """With the exact velocity of a one-image dataset, Euler steps + renoising land on that image."""
    schedule = CascadeSchedule.build(stages)
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    out = sample(
        exact_velocity(target, schedule, 32), schedule, None, 3, 32, torch.Generator().manual_seed(0), steps_per_stage=5
    )
    assert (out - target).abs().max().item() < 1e-4


def test_a_non_square_image_trains_and_samples_along_the_same_paths():
    """Each stage halves both sides; with the exact velocity the sampler lands on a 32 x 64 target."""
    schedule = CascadeSchedule.build(4)
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    batch = build_training_batch(images, torch.tensor([0, 1]), [0, 3], schedule, 4, seed=1, step=1, sample_ids=[0, 1])
    assert batch.layout == PackedLayout.from_grids([(8, 16), (1, 2)])  # top stage 32 x 64 px, bottom 4 x 8
    target = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    velocity = exact_velocity(target, schedule, 64)
    out = sample(velocity, schedule, None, 2, (32, 64), torch.Generator().manual_seed(0), steps_per_stage=5)
    assert out.shape == (2, 3, 32, 64) and (out - target).abs().max().item() < 1e-4


def test_zero_velocity_keeps_the_renoising_statistics():
    """With v = 0 the sample is pure renoising: variance alpha^2 var + beta^2 per stage, and the added block
    noise is anti-correlated inside 2x2 blocks."""
    schedule = CascadeSchedule.build(4)
    out = sample(
        lambda x, t, y: torch.zeros_like(x),
        schedule,
        None,
        256,
        32,
        torch.Generator().manual_seed(0),
        steps_per_stage=2,
    )
    variance = 1.0
    for stage in range(1, 4):
        t0 = schedule.original_start[stage]
        alpha = renoise_scale(t0, schedule.gamma)
        beta = alpha * (1 - t0) / math.sqrt(-schedule.gamma)
        variance = alpha**2 * variance + beta**2
    assert out.var().item() == pytest.approx(variance, rel=0.02)
    assert out.mean().item() == pytest.approx(0.0, abs=0.01)


def test_guidance_combines_conditional_and_unconditional_branches():
    seen = []

    def velocity(x, timesteps, labels):
        seen.append((x.shape[0], None if labels is None else labels.tolist()))
        return torch.where(labels[:, None, None, None] == 9, -1.0, 1.0).expand_as(x).clone()

    schedule = CascadeSchedule.build(2)
    out = sample(
        velocity,
        schedule,
        torch.tensor([1, 2]),
        2,
        8,
        torch.Generator().manual_seed(0),
        steps_per_stage=1,
        guidance=[1.0, 3.0],
        null_class=9,
    )
    assert seen == [(2, [1, 2]), (4, [9, 9, 1, 2])]  # scale 1: conditional branch only
    assert out.shape == (2, 3, 8, 8)


def test_dopri5_integrates_each_stage_over_its_window():
    """dopri5 integrates tau over [0, 1] and, as the reference, tells the model the timestep of 0.999 tau
    (the span of the stage's timestep table)."""
    schedule = CascadeSchedule.build(3)
    target = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    velocity = exact_velocity(target, schedule, 16, tau_scale=0.999)
    out = sample(velocity, schedule, None, 2, 16, torch.Generator().manual_seed(0), solver="dopri5")
    assert (out - target).abs().max().item() < 1e-3


@pytest.mark.slow
def test_compiled_sampling_draws_the_images_eager_sampling_draws(tmp_path, shapes_dataset):
    """`pixelflow sample --compile` (inductor, one graph per stage shape) matches the eager model."""
    from pixelflow.generate import generate
    from pixelflow.model import PixelFlowTransformer
    from pixelflow.parallel.parallelize import apply_compile
    from tests.conftest import tiny_config

    torch._dynamo.reset()
    cfg = tiny_config(tmp_path, shapes_dataset, "cascade.stages=2", "data.resolution=16")
    model = PixelFlowTransformer(cfg.model).eval()
    with torch.inference_mode():
        eager = generate(model, cfg, [1, 2], 2, 0, 1, 2.0)
        apply_compile(model)
        compiled = generate(model, cfg, [1, 2], 2, 0, 1, 2.0)
    torch._dynamo.reset()
    assert (eager.int() - compiled.int()).abs().max() <= 1  # fused kernels may round a level apart
