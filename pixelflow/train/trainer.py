"""The training loop: planned batch -> cascade pairs on the device -> forward/backward -> step -> EMA ->
log -> maybe checkpoint. Everything random is a function of (seed, step), so a resumed run continues
exactly as an uninterrupted one would."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pixelflow.cascade import CascadeSchedule, build_training_batch, per_sequence_mse
from pixelflow.config import Config, to_yaml
from pixelflow.data.loader import Batch, DataStream
from pixelflow.data.planner import plan_stages
from pixelflow.data.storage import storage_options
from pixelflow.model import PixelFlowTransformer
from pixelflow.parallel import parallelize
from pixelflow.train.checkpoint import Checkpointer
from pixelflow.train.ema import EMA
from pixelflow.train.metrics import MetricsLogger
from pixelflow.train.optim import build_optimizer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for a step's noise, times and label dropout."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


class LossWindow:
    """Per-stage loss sums since the last log, kept on the device (no host sync per step)."""

    def __init__(self, stages: int, device: torch.device):
        self.sums = torch.zeros(stages, device=device)
        self.counts = torch.zeros(stages, device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()
        self.grad_norm.zero_()
        self.steps, self.samples, self.started = 0, 0, time.perf_counter()

    def add(self, per_sample: torch.Tensor, stages: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.sums.index_add_(0, stages, per_sample.detach())
        self.counts.index_add_(0, stages, torch.ones_like(per_sample))
        self.grad_norm += grad_norm.detach()
        self.steps += 1
        self.samples += per_sample.numel()

    def summary(self, step: int, lr: float) -> dict:
        sums, counts = self.sums.tolist(), self.counts.tolist()
        record = {"step": step, "loss": sum(sums) / max(sum(counts), 1.0)}
        record.update({f"loss_stage{i}": s / c for i, (s, c) in enumerate(zip(sums, counts)) if c > 0})
        record["grad_norm"] = self.grad_norm.item() / self.steps
        record["lr"] = lr
        record["img_per_s"] = self.samples / (time.perf_counter() - self.started)
        self.reset()
        return record


def train_step(
    model: PixelFlowTransformer,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    step: int,
    cfg: Config,
    schedule: CascadeSchedule,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over the global batch; returns (per-sample loss, stage per sample, grad norm)."""
    count = batch.images.shape[0]
    micro = cfg.train.micro_batch or count
    stages = plan_stages(step, count, schedule.stages, cfg.seed, micro)
    generator = step_generator(cfg.seed, step, device)
    images = batch.images.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    labels = torch.where(labels < 0, torch.full_like(labels, model.null_class), labels)
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    losses, stage_ids = [], []
    optimizer.zero_grad(set_to_none=True)
    for first in range(0, count, micro):
        part = slice(first, first + micro)
        pairs = build_training_batch(
            images[part],
            labels[part],
            stages[part],
            schedule,
            cfg.model.patch_size,
            generator,
            cfg.model.class_dropout,
            model.null_class,
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            prediction = model(
                pairs.tokens, pairs.layout, pairs.timesteps, pairs.labels if cfg.model.num_classes > 0 else None
            )
        per_sample = per_sequence_mse(prediction, pairs.targets, pairs.layout)
        (per_sample.sum() / count).backward()
        losses.append(per_sample.detach())
        stage_ids.append(pairs.stages)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    return torch.cat(losses), torch.cat(stage_ids), grad_norm


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "samples").mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def train(cfg: Config) -> Path:
    """Train (or resume) the run described by cfg; returns the run directory."""
    device = resolve_device(cfg.train.device)
    run_dir = prepare_run_dir(cfg)
    torch.manual_seed(cfg.seed)
    model = PixelFlowTransformer(cfg.model).to(device)
    optimizer, lr_schedule = build_optimizer(model, cfg.train, fused=device.type == "cuda")
    ema = EMA(model, cfg.train.ema_decay)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep)
    resumed = checkpointer.load_latest()
    step = 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        if "optimizer" in resumed:
            optimizer.load_state_dict(resumed["optimizer"])
            lr_schedule.load_state_dict(resumed["lr_scheduler"])
            step = resumed["step"]
            log.info("resumed %s at step %d", run_dir, step)
        else:  # weights only, e.g. converted from the reference: fine-tune from them
            log.info("starting from the weights in %s (no optimizer state)", run_dir / "checkpoints")
            resumed = None
    data = DataStream(
        cfg.data.path,
        cfg.train.global_batch,
        cfg.data.resolution,
        cfg.seed,
        cfg.data.num_workers,
        cfg.data.shuffle_block,
        state=resumed["data"] if resumed else None,
        storage_options=storage_options(cfg.data.path, cfg.data.endpoint_url),
        pin_memory=device.type == "cuda",
        lanes=cfg.data.lanes,
        retries=cfg.data.retries,
        retry_wait=cfg.data.retry_wait,
    )
    schedule = CascadeSchedule.build(cfg.cascade.stages, cfg.cascade.gamma, cfg.cascade.num_train_timesteps)
    parallelize(model, cfg, device)
    metrics = MetricsLogger(run_dir, cfg.wandb, {"config": to_yaml(cfg)}, step, cfg.train.steps)
    window = LossWindow(cfg.cascade.stages, device)
    model.train()
    while step < cfg.train.steps:
        batch = next(data)
        step += 1
        per_sample, stages, grad_norm = train_step(model, optimizer, batch, step, cfg, schedule, device)
        lr = lr_schedule.get_last_lr()[0]  # the rate this step used
        lr_schedule.step()
        ema.update(model)
        window.add(per_sample, stages, grad_norm)
        metrics.advance()
        if step == 1 or step % cfg.train.log_every == 0 or step == cfg.train.steps:
            metrics.log(window.summary(step, lr))
        if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
            checkpointer.save(
                step,
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_schedule.state_dict(),
                    "data": data.state_dict(),
                    "config": to_yaml(cfg),
                },
            )
    metrics.close()
    return run_dir
