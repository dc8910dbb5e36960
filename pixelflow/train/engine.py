"""Training engines: what owns the model, optimizer, LR schedule and EMA, behind one small interface.

The trainer calls `model(...)` for forward passes, `backward(loss, last)` once per micro-batch, `step()` once per
optimizer step, and `checkpoint_parts()` for checkpoints. `FsdpEngine` is the plain model on
one process and FSDP2/HSDP across several; `pixelflow.train.deepspeed_engine.DeepSpeedEngine` drives
DeepSpeed ZeRO-3. Each hands the checkpointer its state as named parts (`checkpoint_parts()`).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from pixelflow.config import Config
from pixelflow.model import PixelFlowTransformer
from pixelflow.parallel import parallelize
from pixelflow.parallel.tensor_parallel import WholeTensors, clip_grad_norm
from pixelflow.parallel.world import World
from pixelflow.train.ema import EMA
from pixelflow.train.optim import build_optimizer

log = logging.getLogger(__name__)


class Engine(Protocol):
    @property
    def model(self) -> torch.nn.Module: ...  # the module a step calls (read-only: each engine has its own kind)

    @property
    def last_lr(self) -> float: ...  # the learning rate of the last step

    steps_in_backward: bool  # the optimizer steps inside the last backward (DeepSpeed): no step can be skipped

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate one micro-batch's gradients; `last` marks the step's final micro-batch."""
        ...

    def step(self, skip_nonfinite: bool = False) -> torch.Tensor: ...

    def checkpoint_parts(self) -> dict[str, Any]:
        """Objects with state_dict()/load_state_dict(): model, ema, optimizer, ... (see train/checkpoint.py)."""
        ...

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The EMA weights by parameter name (sharded where the engine shards; collective)."""
        ...


def initial_model(cfg: Config) -> PixelFlowTransformer:
    """The seeded initial weights, built on the CPU: identical for every engine and world layout."""
    torch.manual_seed(cfg.seed)
    return PixelFlowTransformer(cfg.model)


class FsdpEngine:
    PARTS = ("model", "ema", "optimizer", "lr_schedule")  # of checkpoint_parts()
    steps_in_backward = False

    def __init__(self, cfg: Config, world: World):
        self.world, self.grad_clip = world, cfg.train.grad_clip
        self.model = parallelize(initial_model(cfg).to(world.device), cfg, world.device, world)
        self.tensor_parallel = getattr(self.model, "tensor_parallel", None)
        fused = world.device.type == "cuda" and not world.distributed
        self.optimizer, self.lr_schedule = build_optimizer(self.model, cfg.train, fused=fused)
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.last_lr = float(self.lr_schedule.get_last_lr()[0])

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self, skip_nonfinite: bool = False) -> torch.Tensor:
        """Clip (over the sharded norm), step, advance the LR schedule and the EMA; returns the grad norm.
        skip_nonfinite: a non-finite norm (NaN/inf loss or gradient) is not applied, at one host sync per
        step; otherwise the step never waits for the device (the trainer stops before anything is saved)."""
        if self.tensor_parallel is not None:
            norm = clip_grad_norm(self.model, self.grad_clip, self.tensor_parallel)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if not skip_nonfinite or torch.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_lr = float(self.lr_schedule.get_last_lr()[0])
        self.lr_schedule.step()
        self.ema.update(self.model)
        return norm

    def ema_state(self) -> dict[str, torch.Tensor]:
        return self.checkpoint_parts()["ema"].state_dict()

    def checkpoint_parts(self) -> dict[str, Any]:
        """Tensor-parallel weights, EMA and moments are saved whole, so any tp resumes any other."""
        parts = {
            "model": ModelPart(self.model),
            "ema": self.ema,
            "optimizer": OptimizerPart(self.model, self.optimizer),
        }
        if self.tensor_parallel is not None:
            parts = {name: WholeTensors(part, self.tensor_parallel) for name, part in parts.items()}
        return {**parts, "lr_schedule": self.lr_schedule}


class ModelPart:
    """The model's weights as a checkpoint part: sharded DTensors under FSDP2, plain tensors otherwise;
    full tensors (a weights-only source) load into either."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        full = not any(isinstance(value, DTensor) for value in state.values())
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=full))


class OptimizerPart:
    """AdamW state keyed by parameter name (so it reshards); hyper-parameters travel as plain values."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)
