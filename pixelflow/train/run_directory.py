"""The run directory: owned by one run at a time, holding one lineage of checkpoints and records.

**Ownership.** Rank 0 holds an exclusive POSIX lock on `<run_dir>/.lock` for the run's life, its holder
(host, pid, SLURM job, start time) written inside. The kernel drops the lock when the process dies however
it dies (SIGKILL included), so a stale lock never blocks a restart; a second run meanwhile is one line
naming the holder. POSIX locks belong to a process, so forked data workers never hold it.

**Lineage.** `resume` names where a run *starts*: `auto` (the run directory's newest committed checkpoint),
`none`, or a path (a step folder: the whole training state; an export or converted checkpoint: weights).
Every checkpoint records its lineage's origin, the resume path its first start was given. Once the run
directory holds committed checkpoints of the lineage a `resume=PATH` started, the same command continues
from them (requeues, reruns after exit 75). A start that abandons records of the run directory (a
`resume=PATH` to an older step of this run, or to anything else in a used run directory) branches: the
checkpoints, metrics, sample keys and grids past the start step move into `archive/<time>-after-step-N/`,
where auto-resume never looks; nothing is deleted, and the start point is never pruned.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from pixelflow.config import Config, to_yaml
from pixelflow.data.mixture import saved_sources
from pixelflow.errors import CheckpointError, ConfigError
from pixelflow.records import read_records, split_at_step, write_lines
from pixelflow.weights import (
    CONFIG,
    ResumeSource,
    committed_checkpoints,
    legacy_checkpoints,
    read_state,
    resolve_source,
    verify,
)

log = logging.getLogger(__name__)
LOCK = ".lock"
ARCHIVE = "archive"
METRICS = "metrics.jsonl"


def holder_text(path: Path) -> str:
    """Who holds a lock file, as recorded in it."""
    try:
        holder = json.loads(path.read_text())
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return f"pid {holder['pid']} on {holder['host']}{job}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


class RunLock:
    """Rank 0's hold on a run directory (see the module's docstring)."""

    # lock files this process holds: probing one of them again would release it (closing any descriptor of
    # a file drops the process's POSIX locks on it)
    _held: set[Path] = set()

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir).absolute() / LOCK
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> None:
        """Take the lock (the run directory exists); one ConfigError line when another run holds it. Nothing
        is written until `record()`: a run refused by its checks leaves the file as it was."""
        if self.held:
            return
        if self.path in RunLock._held:
            raise self.in_use()
        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise self.in_use() from None
            log.warning(
                "%s: cannot lock the run directory here (%s): a second run on it would not be refused",
                self.path,
                exc.strerror,
            )
            return
        self._handle = handle
        RunLock._held.add(self.path)

    def record(self) -> None:
        """Write who holds the lock into it, for the message a second run gets."""
        if self._handle is None:
            return
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps(holder) + "\n")
        self._handle.flush()

    def in_use(self) -> ConfigError:
        return ConfigError(
            f"run_dir {self.path.parent}: in use by another run ({holder_text(self.path)}); wait for it to end, "
            f"stop it, or train into another run_dir"
        )

    def check_free(self) -> None:
        """Raise in_use() when another process holds the lock (a launcher's check before it writes)."""
        if self.path in RunLock._held or not self.path.is_file():
            return
        with open(self.path, "a") as probe:
            try:
                fcntl.lockf(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    raise self.in_use() from None
                return
            fcntl.lockf(probe, fcntl.LOCK_UN)

    def release(self) -> None:
        if self._handle is not None:
            fcntl.lockf(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
            RunLock._held.discard(self.path)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(frozen=True)
class StartPlan:
    """Where a run starts and what that does to its run directory."""

    source: ResumeSource | None  # None: from the seeded initial weights
    step: int  # the last step already trained (0 for a fresh start or weights only)
    origin: str | None  # the lineage's origin, recorded in every checkpoint (None: started afresh)
    archive_after: int | None  # records of the run directory past this step belong to another lineage
    data_state: dict | None = None  # the source's lane cursors (a whole training state)
    continued: bool = False  # resume=PATH that already started this run: continuing its own checkpoints
    branches: bool = False  # this start begins a lineage (resume=PATH, not yet started here)
    changes: list[str] = field(default_factory=list)  # config keys that differ from the source's config


def requested_origin(resume: str) -> str:
    """A resume path as the lineage records it: absolute, so every job of the run spells it alike."""
    return str(Path(resume).expanduser().resolve())


def newest_usable(directory: Path, checksums: bool) -> tuple[ResumeSource | None, list[str]]:
    """The newest committed checkpoint that verifies (damaged ones are passed over with a warning)."""
    problems = []
    for folder in reversed(committed_checkpoints(directory)):
        try:
            verify(folder, checksums)
        except CheckpointError as exc:
            log.warning("%s; using the previous committed checkpoint", exc)
            problems.append(str(exc))
            continue
        return ResumeSource(folder, True), problems
    return None, problems


def training_state(source: ResumeSource) -> dict:
    """The 'train' part of a step folder's state: step, lane cursors, the lineage's origin."""
    return read_state(source.path).get("train", {})


def has_records_after(run_dir: Path, step: int) -> bool:
    """Whether the run directory holds checkpoints or logged steps past `step`."""
    if any(int(p.name[5:]) > step for p in committed_checkpoints(run_dir / "checkpoints")):
        return True
    return any(record.get("step", 0) > step for record in read_records(run_dir / METRICS))


def plan_start(cfg: Config, checksums: bool = True) -> StartPlan:
    """Decide where the run starts (see the module's docstring); one clear error when it cannot."""
    run_dir = Path(cfg.run_dir)
    directory = run_dir / "checkpoints"
    committed = committed_checkpoints(directory)
    if cfg.resume == "none":
        if committed:
            raise CheckpointError(
                f"{directory}: resume=none but the run directory already holds checkpoints "
                f"(newest {committed[-1].name}); use another run_dir or resume=auto"
            )
        return StartPlan(None, 0, None, None)
    own, problems = newest_usable(directory, checksums)
    own_state = training_state(own) if own is not None else {}
    if cfg.resume == "auto" or (own is not None and own_state.get("origin") == requested_origin(cfg.resume)):
        if own is not None:
            continued = cfg.resume != "auto"
            return StartPlan(
                own, int(own_state["step"]), own_state.get("origin"), None, own_state.get("data"), continued
            )
        if problems:
            raise CheckpointError(
                f"{directory}: checkpoints present but none usable ({'; '.join(problems)}); nothing was changed"
            )
        legacy = legacy_checkpoints(directory)
        if legacy:
            raise CheckpointError(
                f"{legacy[-1]}: single-file checkpoint from an earlier version, which no longer resumes; "
                f"train on from its weights with resume={legacy[-1]} and another run_dir"
            )
        return StartPlan(None, 0, None, None)
    source = resolve_source(Path(cfg.resume), checksums)
    state = training_state(source) if source.full else {}
    step = int(state.get("step", 0))
    # records of this run past the start (all of them, when the start is not of this run) are another lineage
    inside = source.full and source.path.parent.resolve() == directory.resolve()
    after = step if inside else 0
    archive_after = after if has_records_after(run_dir, after) else None
    return StartPlan(source, step, requested_origin(cfg.resume), archive_after, state.get("data"), branches=True)


def flat_config(text: str) -> dict[str, object]:
    """{dotted key: value} of a config's YAML, environment interpolations left as written."""
    out: dict[str, object] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(OmegaConf.create(text), resolve=False), "")
    return out


def config_changes(cfg: Config, plan: StartPlan) -> list[str]:
    """`key: saved -> now` for every key (but resume) that differs from the config of the whole training state
    the run continues from; a changed data.lanes, which cannot take effect, is refused."""
    if plan.source is None or not plan.source.full:
        return []
    for source, saved in zip(cfg.data.datasets(), saved_sources(cfg.data.datasets(), plan.data_state)):
        if saved and cfg.data.lanes and cfg.data.lanes != saved["num_lanes"]:
            raise ConfigError(
                f"data.lanes = {cfg.data.lanes} but {plan.source.path} reads {source.path} through "
                f"{saved['num_lanes']} lanes, fixed at the run's first start (they fix the global batches): keep "
                f"data.lanes = {saved['num_lanes']} (or 0), or start a new run_dir"
            )
    saved = flat_config((plan.source.path / CONFIG).read_text())
    now = flat_config(to_yaml(cfg))
    keys = sorted((set(saved) | set(now)) - {"resume"})
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in keys if saved.get(key) != now.get(key)]


def archive_lineage(run_dir: Path, after: int) -> Path | None:
    """Move the run directory's records past step `after` (checkpoints, metrics, sample keys, grids, the wandb
    run id and the old config) into archive/<time>-after-step-N/; returns that folder (None: nothing moved)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = run_dir / ARCHIVE / f"{stamp}-after-step-{after:08d}"
    moved = False

    def move(path: Path) -> None:
        nonlocal moved
        target = folder / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved = True

    for checkpoint in committed_checkpoints(run_dir / "checkpoints"):
        if int(checkpoint.name[5:]) > after:
            move(checkpoint)
    grids = run_dir / "samples"
    for grid in sorted(grids.glob("step_*.png")) if grids.is_dir() else []:
        if grid.stem[5:].isdigit() and int(grid.stem[5:]) > after:
            move(grid)
    logs = [run_dir / METRICS, *sorted((run_dir / "sample_keys").glob("*.jsonl"))]
    for path in logs:
        dropped = split_at_step(path, after)
        if dropped:
            target = folder / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_lines(target, dropped)
            moved = True
    if moved:
        for name in ("wandb_id.txt", "config.yaml"):  # a branch is a new wandb run; keep what the old one ran
            if (run_dir / name).is_file():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run_dir / name, folder / name)
        (run_dir / "wandb_id.txt").unlink(missing_ok=True)
    return folder if moved else None
