"""The run directory as the launcher sees it: one per experiment, whichever jobs train it."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

from pixelflow.config import Config, to_yaml
from pixelflow.records import read_records
from pixelflow.train.preflight import preflight
from pixelflow.train.run_directory import requested_origin

SOURCE = Path(__file__).resolve().parent.parent


def code_version() -> dict:
    """The git commit of the code that launches (and a dirty flag), or the installed package's version."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=SOURCE, capture_output=True, text=True
            )
            return {"git_commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"package_version": metadata.version("pixelflow-train")}


def prepare(cfg: Config) -> Path:
    """Make run_dir and a resume path absolute (jobs start elsewhere), run the trainer's own checks (so a
    refused start writes nothing), then write the config snapshot and the code version."""
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    cfg.run_dir = str(run_dir)
    if cfg.resume not in ("auto", "none"):
        cfg.resume = requested_origin(cfg.resume)
    preflight(cfg, checksums=False)  # sizes, not checksums: the job verifies those; a login node need not
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "code_version.json").write_text(json.dumps(code_version(), indent=1) + "\n")
    return run_dir


def last_metrics(run_dir: Path) -> dict | None:
    records = read_records(run_dir / "metrics.jsonl")
    return records[-1] if records else None
