"""Exponential moving average of the model weights, kept in float32 beside the model."""

from __future__ import annotations

import torch
from torch import nn


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
        """Named like the model's parameters, so it loads straight into a model for sampling."""
        return dict(zip(self.names, self.params))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.names if name not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, param in zip(self.names, self.params):
            param.copy_(state[name])
