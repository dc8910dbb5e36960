"""Small device facts every layer uses: host-to-device copies that do not wait, and the CPU's handling of
subnormal floats. Imports torch only, so the model, data, sampling and training all stand above it."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor without making the host wait for the device (pinned, non-blocking)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def flush_denormals() -> None:
    """Treat subnormal floats as zero on the CPU: zero-initialised layers' tiny gradients and Adam moments
    are subnormal early on, and x86 computes with them up to 35x slower (measured on a one-stage cascade)."""
    torch.set_flush_denormal(True)
