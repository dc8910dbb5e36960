"""Which engine a config trains with: the one place that names both (engine.py's FsdpEngine and the
Engine protocol, deepspeed_engine.py's DeepSpeedEngine, which imports DeepSpeed only when chosen)."""

from __future__ import annotations

from pixelflow.config import Config
from pixelflow.parallel.world import World
from pixelflow.train.engine import Engine, FsdpEngine


def checkpoint_part_names(engine: str) -> list[str]:
    """The parts a training checkpoint of this engine holds (the trainer adds its progress, `train`)."""
    if engine == "deepspeed":
        from pixelflow.train.deepspeed_engine import DeepSpeedEngine

        return [*DeepSpeedEngine.PARTS, "train"]
    return [*FsdpEngine.PARTS, "train"]


def build_engine(cfg: Config, world: World) -> Engine:
    if cfg.engine == "deepspeed":
        from pixelflow.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, world)
    return FsdpEngine(cfg, world)
