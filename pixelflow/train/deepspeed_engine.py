"""DeepSpeed ZeRO-3 behind the trainer's engine interface.

Config-driven: the trainer marks the last of its planned micro-batches as the accumulation boundary;
clipping comes from our config; a torch AdamW is passed in, so no fused optimizer op is JIT-built; bf16
on CUDA. The EMA is kept over each rank's ZeRO-3 partition of
every parameter (no gather per step). Checkpoints hold full model and EMA weights (loadable into a plain
model) plus DeepSpeed's own sharded optimizer state in the step folder's `deepspeed/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pixelflow.config import Config
from pixelflow.parallel import parallelize
from pixelflow.parallel.world import World
from pixelflow.train.engine import initial_model
from pixelflow.train.optim import build_optimizer

TAG = "zero"


class PartitionEMA:
    """EMA of each rank's ZeRO-3 partitions, in float32."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.named: list[tuple[str, Any]] = list(module.named_parameters())  # ZeRO-3 parameters: ds_* attributes
        self.params = [p.ds_tensor.detach().float().clone() for _, p in self.named]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.params, [p.ds_tensor.detach().float() for _, p in self.named], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter's partitions gathered and trimmed to its shape (collective)."""
        out = {}
        for (name, param), mine in zip(self.named, self.params):
            parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, mine)
            out[name] = torch.cat(parts)[: param.ds_numel].view(param.ds_shape).cpu()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        rank = dist.get_rank()
        for (name, _), mine in zip(self.named, self.params):
            flat = state[name].reshape(-1).float()
            size = mine.numel()
            padded = torch.nn.functional.pad(flat, (0, size * dist.get_world_size() - flat.numel()))
            mine.copy_(padded[rank * size : (rank + 1) * size].to(mine.device))


class InputsAs(torch.nn.Module):
    """DeepSpeed's bf16 mode runs its forward outside autocast: tokens must arrive in the parameters' dtype
    (timesteps and sizes stay float32; the model casts its sinusoidal features itself)."""

    def __init__(self, engine: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.engine, self.dtype = engine, dtype

    def forward(self, tokens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("text") is not None:
            kwargs["text"] = kwargs["text"].to(self.dtype)
        return self.engine(tokens.to(self.dtype), *args, **kwargs)


class DeepSpeedEngine:
    PARTS = ("model", "ema", "deepspeed")  # of checkpoint_parts()
    steps_in_backward = True

    def __init__(self, cfg: Config, world: World):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if world.device.type == "cuda" else "cpu")
        import deepspeed

        if not dist.is_initialized():  # one process: DeepSpeed still wants a process group, of one rank
            backend = "nccl" if world.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's own launcher's variable

        model = parallelize(initial_model(cfg), cfg, world.device, world)  # kernels only: ZeRO-3 does the rest
        optimizer, lr_schedule = build_optimizer(model, cfg.train)
        config = {  # nominal sizes: the planner's micro-batches vary, the trainer marks the step's last one
            "train_batch_size": world.dp_size,
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.train.grad_clip,
            "zero_optimization": {"stage": 3, "memory_efficient_linear": False},  # plain F.linear: autocast works
            "bf16": {"enabled": world.device.type == "cuda"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, self.lr_schedule = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_schedule,  # pyright: ignore[reportArgumentType] (any torch LRScheduler steps)
            config=config,
            dist_init_required=False,
        )
        self.module: torch.nn.Module = self.engine.module  # pyright: ignore[reportAttributeAccessIssue]
        self.model = InputsAs(self.engine, torch.bfloat16) if world.device.type == "cuda" else self.engine
        self.ema = PartitionEMA(self.module, cfg.train.ema_decay)
        self.last_lr = self._next_lr = self.lr_schedule.get_last_lr()[0]

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """The loss is already this micro-batch's share of the step's mean (no scaling by accumulation
        steps); the step's last micro-batch is DeepSpeed's accumulation boundary, where it reduces and steps."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)
        if last:
            self.engine.step()

    def step(self, skip_nonfinite: bool = False) -> torch.Tensor:
        """DeepSpeed already stepped (and advanced the schedule) at the last micro-batch, whatever
        skip_nonfinite says; record and EMA."""
        self.last_lr, self._next_lr = self._next_lr, self.lr_schedule.get_last_lr()[0]
        norm = self.engine.get_global_grad_norm()
        self.ema.update()
        return torch.as_tensor(float(norm) if norm is not None else 0.0)

    def ema_state(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict()

    def checkpoint_parts(self) -> dict[str, Any]:
        return {"model": GatheredModel(self.module), "ema": self.ema, "deepspeed": NativeState(self)}


class GatheredModel:
    """Full float32 weights (gathered from the ZeRO-3 partitions), so any checkpoint samples without DeepSpeed."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return {name: t.detach().float().cpu().clone() for name, t in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0):
            if dist.get_rank() == 0:
                self.module.load_state_dict(state)


class NativeState:
    """DeepSpeed's own partitioned optimizer and LR schedule state, saved by DeepSpeed into `deepspeed/`.
    Its ZeRO-3 partitions fit one data-parallel size only: another is one clear error."""

    def __init__(self, owner: DeepSpeedEngine):
        self.owner, self.saved_world_size = owner, None

    def state_dict(self) -> dict[str, Any]:
        return {"tag": TAG, "world_size": dist.get_world_size()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved_world_size = state["world_size"]

    def save_files(self, folder: Path) -> None:
        self.owner.engine.save_checkpoint(str(folder / "deepspeed"), tag=TAG)

    def load_files(self, folder: Path) -> None:
        if self.saved_world_size != dist.get_world_size():
            from pixelflow.errors import CheckpointError

            raise CheckpointError(
                f"{folder}: DeepSpeed ZeRO-3 state of {self.saved_world_size} ranks cannot reshard onto "
                f"{dist.get_world_size()}; resume on {self.saved_world_size} ranks, or fine-tune from "
                f"`pixelflow export` of it (weights only)"
            )
        self.owner.engine.load_checkpoint(str(folder / "deepspeed"), tag=TAG)
        self.owner._next_lr = self.owner.lr_schedule.get_last_lr()[0]
