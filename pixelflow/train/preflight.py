"""Everything a run checks before it writes anything, in one function that the trainer (rank 0) and the
launchers (`pixelflow-launch local` and `submit`, before they write the run directory) both call: so a
refused resume, a missing dataset or a run directory in use is one line from either, and nothing is left
behind.

In order: the run directory (a directory, writable, not in use by another run), where the run starts (the
resume choice, the source's integrity, its model shape, its engine, config keys that differ and lanes that
cannot change), the text source (encoder folder or precomputed embeddings), and the dataset (manifest,
classes, shards for the lanes, of each source of a mixture, which must be of one kind).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pixelflow.config import Config
from pixelflow.data.loader import open_sources
from pixelflow.errors import ConfigError
from pixelflow.train.engines import checkpoint_part_names
from pixelflow.train.run_directory import RunLock, StartPlan, config_changes, plan_start
from pixelflow.train.text_conditioning import check_text_source
from pixelflow.weights import check_parts, check_weights_fit, read_state


def check_run_dir(run_dir: Path) -> None:
    """The run directory is a directory, or can be made: one line naming what is in the way."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir / 'checkpoints'}: cannot write the run directory (Not a directory)")
    place = next((p for p in [run_dir, *run_dir.absolute().parents] if p.exists()), None)
    if place is None or not place.is_dir():
        raise ConfigError(f"run_dir: {place or run_dir}: cannot write the run directory (Not a directory)")
    if not os.access(place, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir: {place}: cannot write the run directory (Permission denied)")


def preflight(cfg: Config, lock: RunLock | None = None, checksums: bool = True) -> StartPlan:
    """Check the run described by cfg; returns where it starts. `lock`: the caller's own hold on the run
    directory (the trainer), else the run directory must not be held by anyone (a launcher).
    `checksums=False` verifies checkpoint files by size only (a launcher on a login node)."""
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir)
    if lock is None:
        RunLock(run_dir).check_free()
    plan = plan_start(cfg, checksums)
    if plan.source is not None:
        if plan.source.full:
            check_parts(plan.source.path, read_state(plan.source.path), checkpoint_part_names(cfg.engine))
        check_weights_fit(plan.source, cfg.model)
        plan = dataclasses.replace(plan, changes=config_changes(cfg, plan))
    if cfg.model.text_dim:
        check_text_source(cfg)
    open_sources(cfg.data, num_classes=cfg.model.num_classes, state=plan.data_state)
    return plan
