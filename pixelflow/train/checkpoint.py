"""Checkpoints during training: sharded, optionally asynchronous, committed atomically, verified before use.
The folder format and its offline readers live in pixelflow/weights.py.

The state is a dict of *parts* (model, EMA, optimizer, LR schedule, train progress), each an object with
`state_dict()` / `load_state_dict()` (torchtitan's Stateful pattern). Tensor leaves go through
torch.distributed.checkpoint, so they are saved sharded and resharded on load onto any mesh; the other
leaves go to state.json, so nothing in a checkpoint is unpickled (DCP would unpickle non-tensor values).

A save is written to `.step_NNNNNNNN.tmp/`; once every rank has written its files and checksummed its
share, rank 0 writes the manifest and renames the folder. A folder without its manifest is not a
checkpoint: it is ignored for resume and sampling, takes no keep slot, and our own stale temporaries are
removed after the next commit. An asynchronous save copies the tensors into (pinned) host memory, then
writes and commits on a background thread while training goes on; the next save, a stop or the end of
training waits for it.

A save that fails (a full disk, a lost file system) removes its temporary folder and is one line naming the
step and the cause (`CheckpointSaveError`); an asynchronous one is noticed at the next step boundary
(`failed()`, agreed over the ranks with the stop signals), not at the next save. The newest committed
checkpoint is never touched by a failing save. The start point of the run's lineage (`protect`) is never
pruned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from pixelflow.config import CheckpointConfig, Config, to_yaml
from pixelflow.errors import CheckpointError, RunFailure
from pixelflow.parallel.world import World
from pixelflow.weights import (
    CONFIG,
    CRC,
    MANIFEST,
    SEPARATOR,
    STATE,
    TEMPORARY,
    ResumeSource,
    check_parts,
    check_shapes,
    committed_checkpoints,
    dcp_shapes,
    describe,
    file_crc,
    fsync_dir,
    read_state,
    read_weights,
    step_dir,
    write_durably,
)

log = logging.getLogger(__name__)


class CheckpointSaveError(RunFailure):
    """Writing a checkpoint failed (disk full, file system gone); the message names the step and the cause."""


class Part(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------- layout


# ---------------------------------------------------------------------- tensors to DCP, the rest to JSON


def split_tensors(tree: dict, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensor leaves by path, the same tree without them). Dict nodes stay, even when emptied."""
    tensors, rest = {}, {}
    for key, value in tree.items():
        path = f"{prefix}{SEPARATOR}{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            tensors[path] = value
        elif isinstance(value, dict):
            inner, rest[key] = split_tensors(value, path)
            tensors.update(inner)
        else:
            rest[key] = value
    return tensors, rest


def join_tensors(tree: dict, tensors: dict[str, torch.Tensor], prefix: str) -> dict:
    """Put the tensors whose paths start with prefix back into the tree (the inverse of split_tensors)."""
    out = json.loads(json.dumps(tree))  # a private copy
    start = prefix + SEPARATOR
    for path, tensor in tensors.items():
        if not path.startswith(start):
            continue
        *parents, leaf = path[len(start) :].split(SEPARATOR)
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = tensor
    return out


def _jsonable(tree: dict) -> dict:
    """Tuples become lists (AdamW's betas); anything JSON cannot hold is a programming error."""
    return json.loads(json.dumps(tree))


# --------------------------------------------------------------------------------------- the checkpointer


def background_stager(device: torch.device):
    """DCP's stager for async saves: host copies made once and reused (pinned for CUDA, copied without
    blocking), or None, saving synchronously, where this torch lacks the API (it is young: its options
    have changed between releases; keywords keep a reordering from silently swapping them)."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        pinned = device.type == "cuda"
        options = StagingOptions(
            use_pinned_memory=pinned, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=pinned
        )
        return DefaultStager(options)
    except (ImportError, TypeError) as exc:
        log.warning(
            "checkpoint.async_save: torch %s has no usable DefaultStager (%s): saving synchronously",
            torch.__version__,
            exc,
        )
        return None


class Checkpointer:
    """Saves and loads the parts of one run, from every rank together."""

    def __init__(self, directory: Path, cfg: CheckpointConfig, world: World, config: Config):
        self.directory, self.cfg, self.world = Path(directory), cfg, world
        self.config_yaml = to_yaml(config)
        use_async = cfg.async_save if cfg.async_save is not None else world.device.type == "cuda"
        # a group of its own: the background thread's collectives must not interleave with training's
        self.group = world.group() if world.distributed else None
        self.stager = background_stager(world.device) if use_async else None
        self._thread: threading.Thread | None = None
        self._saving = 0  # the step of the save in flight
        self._error: CheckpointSaveError | None = None
        self.protected: set[Path] = set()  # the lineage's start points in this folder: never pruned
        self.last_blocking_s = 0.0  # how long the last save held the step loop

    # -------------------------------------------------------------------------------------- saving

    def due(self, step: int, last: bool = False) -> bool:
        """Whether this step saves: every checkpoint.every-th and the last (a stop saves whenever it comes)."""
        return last or step % self.cfg.every == 0

    def save(self, step: int, parts: dict[str, Part], blocking: bool = False) -> None:
        """Save (collective). Asynchronous unless blocking or async saving is off; at most one in flight."""
        started = time.perf_counter()
        self.wait()
        tensors, rest = split_tensors({name: part.state_dict() for name, part in parts.items()})
        temporary = self.directory / f".step_{step:08d}.tmp"
        with self._failing_as_save_error(step, temporary):
            problem = None
            if self.world.is_main:
                try:
                    shutil.rmtree(temporary, ignore_errors=True)
                    temporary.mkdir(parents=True)
                    write_durably(temporary / STATE, json.dumps(_jsonable(rest), indent=1))
                    write_durably(temporary / CONFIG, self.config_yaml)
                except OSError as exc:
                    problem = exc
            failed = self._any_rank(problem is not None)  # also a barrier: the folder exists before ranks write
            if problem is not None:
                raise problem
            if failed:
                raise RunFailure("rank 0 could not start the save (its log says why)")
            for part in parts.values():
                save_files = getattr(part, "save_files", None)  # parts with files beside the tensors
                if save_files is not None:
                    save_files(temporary)
            if self.stager is not None and not blocking:
                self._saving = step
                staged = self.stager.stage(tensors)
                self._thread = threading.Thread(
                    target=self._write_in_background, args=(staged, temporary, step), name="checkpoint", daemon=True
                )
                self._thread.start()
            else:
                self._write_and_commit(tensors, temporary, step)
        self.last_blocking_s = time.perf_counter() - started

    @contextlib.contextmanager
    def _failing_as_save_error(self, step: int, temporary: Path):
        """Any failure inside (DCP's CheckpointException is a BaseException) becomes one CheckpointSaveError
        line; the temporary folder goes, so its bytes do not fill the disk further."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit, CheckpointSaveError):
            raise
        except BaseException as exc:
            shutil.rmtree(temporary, ignore_errors=True)
            newest = committed_checkpoints(self.directory)
            kept = f"the newest committed checkpoint, {newest[-1].name}, is intact" if newest else "none was committed"
            raise CheckpointSaveError(
                f"step {step}: saving the checkpoint into {self.directory} failed: {describe(exc)}; {kept}"
            ) from None

    def failed(self) -> bool:
        """Whether the save in flight has failed (never blocks)."""
        return self._error is not None

    def raise_failure(self) -> None:
        """Raise the failed save's error; on a rank whose part did not fail, say that another rank's did
        (without joining its thread, which may wait for that rank forever)."""
        if self._error is not None:
            self.wait()
        raise CheckpointSaveError(
            f"step {self._saving}: saving the checkpoint into {self.directory} failed on another rank (its log "
            f"says why); the newest committed checkpoint is intact"
        )

    def wait(self) -> None:
        """Block until the save in flight is committed; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self, wait: bool = True) -> None:
        """Finish (or, after a failure elsewhere, abandon: it stays uncommitted) the save in flight."""
        if wait:
            self.wait()
        if self.stager is not None:
            if wait:
                self.stager.close()
            self.stager = None

    def _write_in_background(self, tensors: dict, temporary: Path, step: int) -> None:
        try:
            with self._failing_as_save_error(step, temporary):
                self._write_and_commit(tensors, temporary, step)
        except CheckpointSaveError as exc:  # re-raised in the training thread by wait()
            self._error = exc

    def _write_and_commit(self, tensors: dict, temporary: Path, step: int) -> None:
        dcp.save(
            tensors,
            storage_writer=dcp.FileSystemWriter(str(temporary)),
            process_group=self.group,
            no_dist=not self.world.distributed,
        )
        self._barrier()  # every rank's files are complete
        # the same list on every rank: the checksum files that ranks are writing meanwhile are left out
        files = sorted(
            str(p.relative_to(temporary)) for p in temporary.rglob("*") if p.is_file() and not p.name.startswith(CRC)
        )
        mine = files[self.world.rank :: self.world.size]
        sums = {name: {"size": (temporary / name).stat().st_size, "crc32": file_crc(temporary / name)} for name in mine}
        write_durably(temporary / f"{CRC}{self.world.rank}.json", json.dumps(sums))
        self._barrier()
        if self.world.is_main:
            self._commit(temporary, step)
        self._barrier()  # a returned save is a committed one, on every rank

    def _commit(self, temporary: Path, step: int) -> None:
        manifest = {}
        for rank in range(self.world.size):
            part = temporary / f"{CRC}{rank}.json"
            manifest.update(json.loads(part.read_text()))
            part.unlink()
        write_durably(temporary / MANIFEST, json.dumps({"step": step, "files": manifest}, indent=1, sort_keys=True))
        fsync_dir(temporary)
        final = step_dir(self.directory, step)
        if final.is_dir() and not final.is_symlink():  # an uncommitted or damaged leftover of an earlier attempt
            aside = self.directory / f".step_{step:08d}.old"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(temporary, final)
        fsync_dir(self.directory)
        log.info("checkpoint %s committed", final)
        self._prune(final)

    def _prune(self, newest: Path) -> None:
        """Keep the newest `keep` committed, every `keep_every`-th for good, and remove stale temporaries."""
        committed = committed_checkpoints(self.directory)
        kept = {path.resolve() for path in [*committed[-self.cfg.keep :], newest, *self.protected]}
        for folder in committed:
            step = int(folder.name[5:])
            if folder.resolve() not in kept and not (self.cfg.keep_every and step % self.cfg.keep_every == 0):
                shutil.rmtree(folder, ignore_errors=True)
        for entry in self.directory.iterdir():
            if TEMPORARY.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def _barrier(self) -> None:
        if self.world.distributed:
            dist.barrier(group=self.group)

    def _any_rank(self, flag: bool) -> bool:
        """Whether any rank raised the flag (collective)."""
        if not self.world.distributed:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    # ------------------------------------------------------------------------------------- loading

    def load(self, source: ResumeSource, parts: dict[str, Part]) -> None:
        """Load a whole training state (resharded onto this mesh) or, for weights-only sources, the model
        and EMA (collective)."""
        if not source.full:
            weights, _ = read_weights(source.path, "ema")
            for name in ("model", "ema"):
                parts[name].load_state_dict(weights)
            return
        saved = read_state(source.path)
        check_parts(source.path, saved, list(parts))
        tensors, _ = split_tensors({name: part.state_dict() for name, part in parts.items()})
        reader = dcp.FileSystemReader(str(source.path))
        check_shapes(tensors, dcp_shapes(reader), source.path)
        try:
            dcp.load(tensors, storage_reader=reader, process_group=self.group, no_dist=not self.world.distributed)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"{source.path}: cannot be read ({describe(exc)})") from None
        for name, part in parts.items():
            part.load_state_dict(join_tensors(saved[name], tensors, name))
            load_files = getattr(part, "load_files", None)
            if load_files is not None:
                load_files(source.path)


# ------------------------------------------------------------------- weights for sampling and fine-tuning
