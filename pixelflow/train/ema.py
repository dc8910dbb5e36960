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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The float32 EMA tensors themselves (DTensor shards under FSDP), named like the parameters."""
        return dict(zip(self.names, self.params))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """From shards (loaded in place) or from full tensors (a weights-only source), onto any mesh."""
        missing = [name for name in self.names if name not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, param in zip(self.names, self.params):
            value = state[name]
            if value is param:
                continue
            if isinstance(param, DTensor):
                if not isinstance(value, DTensor):
                    value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
                param.to_local().copy_(value.to_local())
            else:
                param.copy_(value.to(device=param.device, dtype=param.dtype))
