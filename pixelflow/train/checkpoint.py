"""Checkpoints: everything needed to continue a run exactly, written atomically, the last K kept.

A checkpoint is one file `step_NNNNNNNN.pt` in `<run_dir>/checkpoints/` with full (unsharded) model and EMA
weights, optimizer state, data cursors, config and step. It is written to a temporary name, flushed to disk
and then renamed, so a crash mid-save leaves the previous checkpoint untouched; an engine that keeps its
own sharded state (DeepSpeed) writes `step_NNNNNNNN.deepspeed/` first, and the .pt file is the commit
marker for both. Files are read back with `weights_only=True` (no pickled code runs on load), memory-mapped.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Committed checkpoints in a directory, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file, a checkpoints directory or a run directory (newest wins)."""
    path = Path(path)
    if path.is_file():
        return path
    for directory in (path / "checkpoints", path):
        found = list_checkpoints(directory)
        if found:
            return found[-1]
    raise CheckpointError(f"{path}: no checkpoint found (expected step_NNNNNNNN.pt here or under checkpoints/)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as exc:  # truncated zip, wrong format, disallowed pickle: all unusable
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a pixelflow checkpoint (no model/step entries)")
    return state


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory)
        self.keep = keep

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = checkpoint_path(self.directory, step)
        temporary = final.with_name(final.name + ".partial")
        with open(temporary, "wb") as handle:
            torch.save({**state, "step": step}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        for old in list_checkpoints(self.directory)[: -self.keep]:
            old.unlink(missing_ok=True)
            shutil.rmtree(old.with_suffix(".deepspeed"), ignore_errors=True)  # an engine's own shards, if any
        return final

    def load_latest(self) -> dict[str, Any] | None:
        """The newest readable checkpoint, or None for a fresh run. An unreadable newest one is reported
        and the one before it used, so a damaged file costs steps, not the run."""
        for path in reversed(list_checkpoints(self.directory)):
            try:
                return load_checkpoint(path)
            except CheckpointError as exc:
                log.error("%s; falling back to the previous checkpoint", exc)
        return None
