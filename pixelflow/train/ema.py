"""Exponential moving average of the model weights, kept in float32 beside the model.

Under FSDP2 the parameters are DTensor shards and so is the EMA: each rank updates only its shard (no
gather per step); full tensors are assembled only for checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.params, current, 1.0 - self.decay)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full float32 tensors on the CPU, named like the model's parameters (collective under FSDP)."""
        return {
            name: (p.full_tensor() if isinstance(p, DTensor) else p).cpu() for name, p in zip(self.names, self.params)
        }

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.names if name not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, param in zip(self.names, self.params):
            full = state[name].to(device=param.device, dtype=param.dtype)
            if isinstance(param, DTensor):
                param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements).to_local())
            else:
                param.copy_(full)
