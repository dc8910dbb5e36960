"""Training metrics: metrics.jsonl in the run directory, a progress bar, and optionally wandb."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pixelflow.config import WandbConfig
from pixelflow.records import split_at_step

log = logging.getLogger(__name__)


def _wandb_has_key() -> bool:
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


class MetricsLogger:
    """Appends one JSON object per logged step; on resume, drops lines past the checkpoint's step so a
    restarted run never leaves duplicate or stale steps behind."""

    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, config: dict, start_step: int, total_steps: int):
        self.path = run_dir / "metrics.jsonl"
        self._file = open_at_step(self.path, start_step)
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=None)
        self._wandb = self._start_wandb(wandb_cfg, run_dir, config)

    @staticmethod
    def _start_wandb(cfg: WandbConfig, run_dir: Path, config: dict):
        if cfg.mode == "disabled":
            return None
        mode = cfg.mode
        if mode == "online" and not _wandb_has_key():
            log.warning("wandb.mode=online but no API key is configured; logging offline instead")
            mode = "offline"
        import wandb  # imported only when used: it is slow to import

        return wandb.init(
            project=cfg.project,
            name=cfg.name,
            dir=str(run_dir),
            mode=mode,
            config=config,
            resume="allow",
            id=_wandb_run_id(run_dir),
        )

    def advance(self) -> None:
        self._bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._bar.disable:
            print(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                file=sys.stdout,
                flush=True,
            )
        else:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")

    def log_image(self, path: Path, step: int) -> None:
        """A sample grid, to wandb (the PNG itself is already in the run directory)."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({"samples": wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def open_at_step(path: Path, step: int):
    """Open a JSON-lines log for appending after dropping the records of steps past `step` (written after
    the checkpoint a run resumes from, so they are about to be written again) and a torn last line."""
    split_at_step(path, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a")


class SampleKeyLog:
    """Which samples one data rank trained on at each step (`train.log_sample_keys`): an audit trail that
    shows no sample is repeated or skipped across restarts and layout changes."""

    def __init__(self, run_dir: Path, dp_rank: int, start_step: int):
        self._file = open_at_step(run_dir / "sample_keys" / f"dp_rank_{dp_rank:05d}.jsonl", start_step)

    def log(self, step: int, keys: list[str]) -> None:
        self._file.write(json.dumps({"step": step, "keys": keys}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _wandb_run_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(os.urandom(6).hex())
    return id_file.read_text().strip()
