"""Cascade flow-matching maths: stage geometry, training pairs, loss and the sampler.

Pure tensor functions. Stage 0 is the lowest resolution (starts from pure noise), stage S-1 the full one.
Time runs from noise (0) to data (1); stage s covers [s/S, (s+1)/S] of it, its start rescaled for s > 0 so
that upsampled-and-renoised samples from the stage below land on the right marginal (gamma = -1/3).
All numbers follow the public reference scheduler so converted checkpoints sample correctly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pixelflow.devices import to_device
from pixelflow.model.layout import PackedLayout, Piece, patchify, stream_pieces


@dataclass(frozen=True)
class CascadeSchedule:
    stages: int
    gamma: float
    num_train_timesteps: int
    original_start: tuple[float, ...]  # stage start on the original time axis, s/S
    start: tuple[float, ...]  # the stage's start time after the renoising rescale
    end: tuple[float, ...]
    timestep_start: tuple[float, ...]  # global model timestep (0..T-1 scale) at the stage's start
    timestep_end: tuple[float, ...]

    @staticmethod
    def build(stages: int, gamma: float = -1.0 / 3.0, num_train_timesteps: int = 1000) -> CascadeSchedule:
        steps = num_train_timesteps

        def grid(index: int) -> float:  # the reference's float32 time grid i / T
            return float(np.float32(index) / np.float32(steps))

        original, start, end = [], [], []
        for s in range(stages):
            start_index, end_index = int(steps * s / stages), min(int(steps * (s + 1) / stages), steps)
            t0 = grid(start_index)
            original.append(t0)
            start.append(t0 * renoise_scale(t0, gamma) if s > 0 else t0)
            end.append(grid(end_index) if end_index < steps else 1.0)
        distance = [e - s for s, e in zip(start, end)]
        total = sum(distance)
        timestep_start, timestep_end = [], []
        for s in range(stages):
            start_ratio = 0.0 if s == 0 else sum(distance[:s]) / total
            end_ratio = 1.0 if s == stages - 1 else sum(distance[: s + 1]) / total
            timestep_start.append(float(int(steps * start_ratio)))
            timestep_end.append(float(min(int(steps * end_ratio), steps - 1)))
        return CascadeSchedule(
            stages, gamma, steps, tuple(original), tuple(start), tuple(end), tuple(timestep_start), tuple(timestep_end)
        )

    def side(self, resolution: int, stage: int) -> int:
        """Image side in pixels at a stage."""
        return resolution // 2 ** (self.stages - 1 - stage)

    def timestep(self, stage: int, tau: torch.Tensor) -> torch.Tensor:
        """Global model timestep at position tau in [0, 1) inside a stage (the reference's per-stage tables).

        The top stage's table spans T-1 grid steps instead of T, hence its different denominator.
        """
        span = self.timestep_end[stage] - self.timestep_start[stage]
        steps = self.num_train_timesteps
        denominator = steps - 1 if stage == self.stages - 1 else steps
        return self.timestep_start[stage] + span * tau * (steps / denominator)


def renoise_scale(t0: float, gamma: float) -> float:
    """alpha: how much an upsampled sample at original time t0 is scaled when renoised into the next stage."""
    return 1.0 / (math.sqrt(1.0 - 1.0 / gamma) * (1.0 - t0) + t0)


def halve(images: torch.Tensor) -> torch.Tensor:
    """2x downsample; equal to bilinear interpolation (align_corners=False) at exactly half size."""
    return F.avg_pool2d(images, 2)


def double(images: torch.Tensor) -> torch.Tensor:
    """2x nearest-neighbour upsample."""
    return images.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


@dataclass
class TrainingBatch:
    """Packed model inputs and targets for one micro-batch, sequences grouped by stage (highest first)."""

    tokens: torch.Tensor  # (N, C*p*p) x_tau
    targets: torch.Tensor  # (N, C*p*p) velocity end' - start'
    layout: PackedLayout
    timesteps: torch.Tensor  # (B,) global model timesteps
    labels: torch.Tensor  # (B,) class labels after CFG dropout
    stages: torch.Tensor  # (B,) stage of every sequence
    order: list[int]  # order[i] = index in the input batch of sequence i
    draws: torch.Tensor  # (B,) the sample's uniform draw deciding condition dropout (class or caption)


def stage_pair(images: torch.Tensor, stage: int, schedule: CascadeSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(end, start) images of a stage from full-resolution images in [-1, 1], before noising."""
    end = images
    for _ in range(schedule.stages - 1 - stage):
        end = halve(end)
    return end, double(halve(end))


def sample_seed(seed: int, step: int, sample_id: int) -> int:
    """The seed of one sample's noise, time and label dropout at one step."""
    return ((seed * 1_000_003 + step) * 1_000_033 + sample_id) % (2**63)


def build_training_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    stages: Sequence[int],
    schedule: CascadeSchedule,
    patch_size: int,
    seed: int,
    step: int,
    sample_ids: Sequence[int],
    class_dropout: float = 0.0,
    null_class: int = 0,
) -> TrainingBatch:
    """Flow-matching pairs for uint8 images (B, C, H, W) with a stage per sample, on images' device (H and W
    multiples of patch_size x 2^(stages-1)).

    For a sample at stage s with noise n, position tau in [0, 1) inside the stage:
    end' = t_end*end + (1-t_end)*n, start' = t_start*start + (1-t_start)*n,
    x = tau*end' + (1-tau)*start', target = end' - start'.
    A sample's noise, tau and label dropout come from its own generator, seeded by (seed, step, sample id):
    the same global batch gives the same pairs however it is split over ranks and micro-batches.
    """
    device = images.device
    steps = schedule.num_train_timesteps
    generator = torch.Generator(device=device)
    tokens, targets, timesteps, stage_ids, grids, order, dropped = [], [], [], [], [], [], []
    for stage in sorted(set(stages), reverse=True):
        members = [i for i, s in enumerate(stages) if s == stage]
        chosen = images.index_select(0, to_device(torch.tensor(members), device))
        end, start = stage_pair(to_unit_range(chosen), stage, schedule)
        noise, index = [], []
        for member in members:
            generator.manual_seed(sample_seed(seed, step, sample_ids[member]))
            noise.append(torch.randn(end.shape[1:], generator=generator, device=device))
            index.append(torch.randint(0, steps, (1,), generator=generator, device=device))
            dropped.append(torch.rand(1, generator=generator, device=device))
        noise = torch.stack(noise)
        end = schedule.end[stage] * end + (1.0 - schedule.end[stage]) * noise
        start = schedule.start[stage] * start + (1.0 - schedule.start[stage]) * noise
        tau = torch.cat(index).double() / steps
        timesteps.append(schedule.timestep(stage, tau).float())
        tau = tau.float().view(-1, 1, 1, 1)
        tokens.append(patchify(tau * end + (1.0 - tau) * start, patch_size))
        targets.append(patchify(end - start, patch_size))
        stage_ids += [stage] * len(members)
        grids += [(end.shape[-2] // patch_size, end.shape[-1] // patch_size)] * len(members)
        order += members
    labels = labels.to(device).index_select(0, to_device(torch.tensor(order), device))
    draws = torch.cat(dropped)
    if class_dropout > 0:
        labels = torch.where(draws < class_dropout, torch.full_like(labels, null_class), labels)
    return TrainingBatch(
        tokens=torch.cat(tokens),
        targets=torch.cat(targets),
        layout=PackedLayout.from_grids(grids),
        timesteps=torch.cat(timesteps),
        labels=labels,
        stages=to_device(torch.tensor(stage_ids), device),
        order=order,
        draws=draws,
    )


def per_sequence_mse(
    prediction: torch.Tensor, target: torch.Tensor, layout: PackedLayout, pieces: tuple[Piece, ...] | None = None
) -> torch.Tensor:
    """(B,) mean squared error of every sequence over its tokens and channels, in float32.

    With `pieces` (a sequence-parallel rank's slice of the stream) each value is this slice's share of the
    sequence's error: the shares of a group's ranks add up to the full value; padding counts for nothing.
    """
    squared = (prediction.float() - target.float()).pow(2)
    channels = squared.shape[-1]
    values, start, first = [], 0, None
    for piece in pieces if pieces is not None else stream_pieces(layout):
        chunk = squared[start : start + piece.tokens]
        start += piece.tokens
        if piece.first_sequence is None:
            continue
        first = piece.first_sequence if first is None else first
        values.append(chunk.reshape(piece.count, -1).sum(1) / (piece.grid[0] * piece.grid[1] * channels))
    held = torch.cat(values) if values else squared.new_zeros(0)
    first = first or 0
    return F.pad(held, (first, layout.num_sequences - first - held.shape[0]))


# --------------------------------------------------------------------------------------------- sampling


def block_noise(shape: Sequence[int], gamma: float, generator: torch.Generator, device: torch.device | str):
    """Gaussian noise whose 2x2 pixel blocks have covariance (1-gamma) I + gamma 11^T (one matmul)."""
    b, c, h, w = shape
    covariance = (1 - gamma) * torch.eye(4, dtype=torch.float64) + gamma * torch.ones(4, 4, dtype=torch.float64)
    factor = torch.linalg.cholesky(covariance + 1e-6 * torch.eye(4, dtype=torch.float64)).float().to(device)
    white = torch.randn((b, c, h // 2, w // 2, 4), generator=generator, device=device)
    blocks = (white @ factor.T).reshape(b, c, h // 2, w // 2, 2, 2)
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def default_cfg_ramp(stages: int) -> list[float]:
    """Fraction of the way from 1 to the final CFG scale per stage: the paper's (0, 1/6, 2/3, 1) for 4 stages."""
    if stages == 4:
        return [0.0, 1.0 / 6.0, 2.0 / 3.0, 1.0]
    return [s / (stages - 1) if stages > 1 else 1.0 for s in range(stages)]


def cfg_scales(cfg: float, ramp: Sequence[float]) -> list[float]:
    """Per-stage guidance scales 1 + (cfg - 1) * ramp[s]; cfg = 0 turns guidance off (scale 1 everywhere)."""
    return [1.0 if cfg == 0 else 1.0 + (cfg - 1.0) * r for r in ramp]


def stage_time_grid(schedule: CascadeSchedule, stage: int, steps: int, shift: float = 1.0) -> np.ndarray:
    """tau points of a stage's Euler steps, with the final 1.0 appended (the reference's grid).

    The grid stops at (T-1)/T, so the last step is a short one; kept for fidelity with published samples.
    """
    last = (schedule.num_train_timesteps - 1) / schedule.num_train_timesteps
    tau = np.linspace(0.0, last, steps, dtype=np.float64)
    return np.append(tau / (shift + (1.0 - shift) * tau), 1.0)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@torch.no_grad()
def sample(
    velocity: VelocityFn,
    schedule: CascadeSchedule,
    labels: torch.Tensor | None,
    count: int,
    resolution: int | tuple[int, int],
    generator: torch.Generator | Sequence[torch.Generator],
    steps_per_stage: int | Sequence[int] = 30,
    guidance: Sequence[float] | None = None,
    null_class: int = 0,
    channels: int = 3,
    shift: float = 1.0,
    solver: str = "euler",
    on_steps: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Generate `count` images in [-1, 1], stage by stage, with classifier-free guidance.

    velocity(x, timesteps, labels) is the model on a plain image batch; guidance holds one CFG scale per
    stage (scale 1 runs the conditional branch alone). Within a stage: the reference's Euler grid, or
    adaptive dopri5 (torchdiffeq, atol 1e-6, rtol 1e-3, as the reference). Between stages: nearest 2x
    upsample, then renoise with correlated block noise. All per-step work stays on the device.
    on_steps(n) is told of every n solver steps done (a progress bar; a dopri5 stage counts as steps_per_stage).
    `generator` may be one per image: each image's noise is then the noise it gets sampled alone.
    `resolution`: the final side, or (height, width) for a non-square image (multiples of 2^(stages-1)).
    """
    generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
    device = generators[0].device

    def noise(draw: Callable, shape: Sequence[int]) -> torch.Tensor:
        if len(generators) == 1:
            return draw(shape, generators[0])
        return torch.cat([draw((1, *shape[1:]), own) for own in generators])

    steps = [steps_per_stage] * schedule.stages if isinstance(steps_per_stage, int) else list(steps_per_stage)
    guidance = list(guidance) if guidance is not None else [1.0] * schedule.stages
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    first = (count, channels, schedule.side(height, 0), schedule.side(width, 0))
    x = noise(lambda shape, own: torch.randn(shape, generator=own, device=device), first)
    both_labels = None if labels is None else torch.cat([torch.full_like(labels, null_class), labels]).to(device)
    labels = None if labels is None else labels.to(device)

    def guided(x: torch.Tensor, timestep: torch.Tensor, scale: float) -> torch.Tensor:
        if labels is None or scale == 1.0:
            return velocity(x, timestep.expand(count), labels).float()
        uncond, cond = velocity(torch.cat([x, x]), timestep.expand(2 * count), both_labels).float().chunk(2)
        return uncond + scale * (cond - uncond)

    for stage in range(schedule.stages):
        if stage > 0:
            t0 = schedule.original_start[stage]
            alpha = renoise_scale(t0, schedule.gamma)
            beta = alpha * (1.0 - t0) / math.sqrt(-schedule.gamma)
            x = double(x)
            x = alpha * x + beta * noise(lambda shape, own: block_noise(shape, schedule.gamma, own, device), x.shape)
        if solver == "dopri5":
            x = _dopri5_stage(guided, x, schedule, stage, guidance[stage])
            if on_steps:
                on_steps(steps[stage])
            continue
        tau = stage_time_grid(schedule, stage, steps[stage], shift)
        timesteps = schedule.timestep(stage, torch.tensor(tau[:-1], device=device)).float()
        for i in range(steps[stage]):
            x = x + float(tau[i + 1] - tau[i]) * guided(x, timesteps[i], guidance[stage])
            if on_steps:
                on_steps(1)
    return x


def _dopri5_stage(guided, x: torch.Tensor, schedule: CascadeSchedule, stage: int, scale: float) -> torch.Tensor:
    """Integrate one stage over tau in [0, 1] with the model timestep spanning the stage's table."""
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise RuntimeError("solver 'dopri5' needs torchdiffeq: pip install 'pixelflow-train[ode]'") from None
    last = (schedule.num_train_timesteps - 1) / schedule.num_train_timesteps

    def field(tau: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return guided(state, schedule.timestep(stage, tau * last).float(), scale)

    times = torch.tensor([0.0, 1.0], dtype=torch.float32, device=x.device)
    return odeint(field, x, times, method="dopri5", atol=1e-6, rtol=1e-3)[-1]  # pyright: ignore[reportReturnType] (one state in, one out)
