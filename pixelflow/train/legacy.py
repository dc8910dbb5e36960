"""Converting a single-file checkpoint of an earlier version (`step_NNNNNNNN.pt`: full model, EMA,
optimizer, LR schedule and data cursors) into a step folder beside it, so the run resumes exactly."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

from pixelflow.config import CheckpointConfig, from_yaml
from pixelflow.errors import CheckpointError
from pixelflow.parallel.world import World
from pixelflow.train.checkpoint import Checkpointer
from pixelflow.train.engine import FsdpEngine
from pixelflow.weights import load_legacy, step_dir


class _Saved:
    """A checkpoint part that hands back a state it was given."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def convert_legacy(path: Path) -> Path:
    """Write checkpoints/step_NNNNNNNN/ next to the file; returns that folder."""
    path = Path(path)
    state = load_legacy(path)
    if "optimizer" not in state or "data" not in state:
        raise CheckpointError(
            f"{path}: holds weights only (no optimizer or data state); fine-tune from it with resume={path} "
            f"or export it with `pixelflow export {path} OUT`"
        )
    cfg = from_yaml(state["config"])
    world = World(0, 1, torch.device("cpu"))
    engine = FsdpEngine(cfg, world)
    engine.model.load_state_dict(state["model"])
    engine.ema.load_state_dict(state["ema"])
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(engine.model, engine.optimizer, state["optimizer"], options=options)
    engine.lr_schedule.load_state_dict(state["lr_scheduler"])
    step = int(state["step"])
    parts = {**engine.checkpoint_parts(), "train": _Saved({"step": step, "data": state["data"]})}
    checkpointer = Checkpointer(path.parent, CheckpointConfig(keep=1 << 30), world, cfg)
    checkpointer.save(step, parts, blocking=True)
    checkpointer.close()
    return step_dir(path.parent, step)
