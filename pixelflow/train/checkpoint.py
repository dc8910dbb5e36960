"""Checkpoints: sharded, optionally asynchronous, committed atomically, verified before use.

A checkpoint is one folder `<run_dir>/checkpoints/step_NNNNNNNN/`:

    .metadata, __R_I.distcp   every tensor of every part, written by all ranks in parallel (DCP)
    state.json                everything else (step, data cursors, LR schedule, optimizer hyper-parameters)
    config.yaml               the run's config
    deepspeed/                DeepSpeed's own save, for that engine only
    manifest.json             size and CRC32 of every file above: written last, it is the commit record

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

Test hook: PIXELFLOW_TEST_STALL_COMMIT=<step>:<seconds> makes rank 0 wait that long before committing
that step's save (every rank's files written, no manifest yet), so tests can kill a run mid-save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from pixelflow.config import CheckpointConfig, Config, ModelConfig, from_yaml, to_yaml
from pixelflow.errors import RunFailure
from pixelflow.parallel.world import World
from pixelflow.paths import writable

log = logging.getLogger(__name__)
# DCP warns on every single-process save and load, which is what one process without a group means here
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
COMMITTED = re.compile(r"^step_(\d{8})$")
TEMPORARY = re.compile(r"^\.step_\d{8}\.(tmp|old)$")
LEGACY = re.compile(r"^step_(\d{8})\.pt$")
MANIFEST, STATE, CONFIG = "manifest.json", "state.json", "config.yaml"
CRC = ".crc-"  # each rank's share of the checksums, merged into the manifest at commit
EXPORT_WEIGHTS = "model.safetensors"
SEPARATOR = "/"  # joins a tensor's path through the nested state into its DCP key (names contain dots)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it."""


class CheckpointSaveError(RunFailure):
    """Writing a checkpoint failed (disk full, file system gone); the message names the step and the cause."""


def root_cause(exc: BaseException) -> BaseException:
    """The OSError behind a failure (DCP wraps every rank's failure in a CheckpointException), else exc."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += [item[0] if isinstance(item, tuple) else item for item in failures.values()]
        pending += [link for link in (current.__cause__, current.__context__) if link is not None]
    return exc


def describe(exc: BaseException) -> str:
    """One line for a failure: an OSError's reason and file, else the first line of its message."""
    cause = root_cause(exc)
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.strerror} ({cause.filename})" if cause.filename else cause.strerror
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


class Part(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------- layout


def step_dir(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}"


def committed_checkpoints(directory: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first; anything else in the folder is ignored."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if COMMITTED.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def legacy_checkpoints(directory: Path) -> list[Path]:
    """Single-file checkpoints (`step_NNNNNNNN.pt`) written by earlier versions, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if LEGACY.match(p.name) and p.is_file()), key=lambda p: p.name)


def file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify(folder: Path, checksums: bool = True) -> None:
    """Raise CheckpointError naming the first file that is missing, truncated or (checksums) damaged."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: unreadable manifest ({exc})") from None
    for name, expected in sorted(files.items()):
        path = folder / name
        try:
            size = path.stat().st_size
            if size != expected["size"]:
                raise CheckpointError(f"{path}: {size} bytes, the manifest says {expected['size']} (truncated?)")
            if checksums and file_crc(path) != expected["crc32"]:
                raise CheckpointError(f"{path}: checksum differs from the manifest (damaged)")
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_file(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


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


@dataclass(frozen=True)
class ResumeSource:
    path: Path
    full: bool  # True: the whole training state (a step folder); False: weights only (export, old file)


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
                    _write_file(temporary / STATE, json.dumps(_jsonable(rest), indent=1))
                    _write_file(temporary / CONFIG, self.config_yaml)
                except OSError as exc:
                    problem = exc
            failed = self._any_rank(problem is not None)  # also a barrier: the folder exists before ranks write
            if problem is not None:
                raise problem
            if failed:
                raise RunFailure("rank 0 could not start the save (its log says why)")
            for part in parts.values():
                if hasattr(part, "save_files"):
                    part.save_files(temporary)
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
        _write_file(temporary / f"{CRC}{self.world.rank}.json", json.dumps(sums))
        self._barrier()
        if self.world.is_main:
            _stall_if_asked(step)
            self._commit(temporary, step)
        self._barrier()  # a returned save is a committed one, on every rank

    def _commit(self, temporary: Path, step: int) -> None:
        manifest = {}
        for rank in range(self.world.size):
            part = temporary / f"{CRC}{rank}.json"
            manifest.update(json.loads(part.read_text()))
            part.unlink()
        _write_file(temporary / MANIFEST, json.dumps({"step": step, "files": manifest}, indent=1, sort_keys=True))
        _fsync_dir(temporary)
        final = step_dir(self.directory, step)
        if final.is_dir() and not final.is_symlink():  # an uncommitted or damaged leftover of an earlier attempt
            aside = self.directory / f".step_{step:08d}.old"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(temporary, final)
        _fsync_dir(self.directory)
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
            if hasattr(part, "load_files"):
                part.load_files(source.path)


def _stall_if_asked(step: int) -> None:
    stall_step, _, seconds = os.environ.get("PIXELFLOW_TEST_STALL_COMMIT", "").partition(":")
    if stall_step and int(stall_step) == step:
        time.sleep(float(seconds))


def check_parts(folder: Path, saved: dict, wanted: list[str]) -> None:
    """One line when a step folder lacks a part this engine loads (another engine wrote it)."""
    missing = [name for name in wanted if name not in saved]
    if missing:
        raise CheckpointError(
            f"{folder}: written by another engine: it has no '{missing[0]}' state "
            f"(it holds {', '.join(sorted(saved))}); resume it with the engine that wrote it"
        )


def dcp_shapes(reader: dcp.FileSystemReader) -> dict[str, list[int]]:
    """The shape of every tensor a step folder holds, from its metadata (nothing loaded)."""
    metadata = reader.read_metadata().state_dict_metadata
    return {key: list(meta.size) for key, meta in metadata.items() if hasattr(meta, "size")}


def check_shapes(tensors: dict[str, torch.Tensor], saved: dict[str, list[int]], where: Path) -> None:
    """One line naming the first tensor that this model and the checkpoint disagree on."""
    for key, tensor in tensors.items():
        if key not in saved:
            raise CheckpointError(f"{where}: the checkpoint has no tensor '{key}' (a different model?)")
        shape = saved[key]
        if shape != list(tensor.shape):
            raise CheckpointError(
                f"{where}: tensor '{key}' is {shape} in the checkpoint but {list(tensor.shape)} in this model"
            )
    weights = {key.split(SEPARATOR)[0] for key in tensors} & {"model", "ema"}
    for key in saved:
        if key.split(SEPARATOR)[0] in weights and key not in tensors:
            raise CheckpointError(f"{where}: the checkpoint has tensor '{key}' that this model lacks")


# ------------------------------------------------------------------- weights for sampling and fine-tuning


def resolve_source(path: Path, checksums: bool = True) -> ResumeSource:
    """A step folder, a run directory (or its checkpoints/), an export, or an earlier single-file checkpoint."""
    if path.is_file():
        return ResumeSource(path, False)
    if (path / EXPORT_WEIGHTS).is_file():
        return ResumeSource(path, False)
    if (path / MANIFEST).is_file():
        verify(path, checksums)
        return ResumeSource(path, True)
    for directory in (path / "checkpoints", path):
        committed = committed_checkpoints(directory)
        if committed:
            verify(committed[-1], checksums)
            return ResumeSource(committed[-1], True)
        legacy = legacy_checkpoints(directory)
        if legacy:
            return ResumeSource(legacy[-1], False)
    raise CheckpointError(
        f"{path}: no checkpoint found (expected a run directory, a step_NNNNNNNN folder or an export)"
    )


def read_state(folder: Path) -> dict:
    """A step folder's state.json: everything of the training state that is not a tensor."""
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / STATE}: unreadable ({exc})") from None


def source_config(source: ResumeSource) -> Config:
    """The config a checkpoint, an export or an earlier single-file checkpoint was written with."""
    if source.path.is_file():
        return from_yaml(load_legacy(source.path)["config"], unset_env_ok=True)
    if not (source.path / CONFIG).is_file():
        what = "model.safetensors" if (source.path / EXPORT_WEIGHTS).is_file() else "the checkpoint"
        raise CheckpointError(f"{source.path}: no {CONFIG} beside {what} (an export is both files)")
    return from_yaml((source.path / CONFIG).read_text(), unset_env_ok=True)


def saved_shapes(source: ResumeSource) -> dict[str, list[int]]:
    """Shape of every tensor a source holds, keyed as in a step folder (model/..., ema/..., ...), read from its
    metadata or header: nothing is loaded."""
    if source.path.is_file():
        state = load_legacy(source.path)
        return {
            f"{part}{SEPARATOR}{name}": list(t.shape) for part in ("model", "ema") for name, t in state[part].items()
        }
    if (source.path / EXPORT_WEIGHTS).is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(source.path / EXPORT_WEIGHTS), "pt") as weights:
                names = list(weights.keys())
                return {f"model{SEPARATOR}{name}": list(weights.get_slice(name).get_shape()) for name in names}
        except Exception as exc:  # a header that is not safetensors
            raise CheckpointError(f"{source.path / EXPORT_WEIGHTS}: unreadable ({describe(exc)})") from None
    return dcp_shapes(dcp.FileSystemReader(str(source.path)))


def check_weights_fit(source: ResumeSource, model: ModelConfig) -> None:
    """One line naming the first weight a model of this config and the source disagree on."""
    from pixelflow.model import PixelFlowTransformer

    with torch.device("meta"):
        wanted = PixelFlowTransformer(model).state_dict()
    parts = ("model", "ema") if source.full or source.path.is_file() else ("model",)
    template = {f"{part}{SEPARATOR}{name}": t for part in parts for name, t in wanted.items()}
    check_shapes(template, saved_shapes(source), source.path)


def read_weights(path: Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], Config]:
    """(full float32 weights, config) from any checkpoint `resolve_source` accepts; `which` is ema|model."""
    source = resolve_source(Path(path))
    cfg = source_config(source)
    check_weights_fit(source, cfg.model)
    if source.path.is_file():
        return load_legacy(source.path)[which], cfg
    if (source.path / EXPORT_WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(source.path / EXPORT_WEIGHTS), cfg
    from pixelflow.model import PixelFlowTransformer

    with torch.device("meta"):
        names = list(PixelFlowTransformer(cfg.model).state_dict().items())
    template = {f"{which}{SEPARATOR}{name}": torch.empty(t.shape, dtype=torch.float32) for name, t in names}
    reader = dcp.FileSystemReader(str(source.path))
    try:
        dcp.load(template, storage_reader=reader, no_dist=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{source.path}: cannot be read ({describe(exc)})") from None
    return {key.split(SEPARATOR, 1)[1]: tensor for key, tensor in template.items()}, cfg


def source_identity(source: ResumeSource) -> dict:
    """What tells one checkpoint's weights from another's: its place and the checksum of its contents (a step
    folder's manifest lists every file's CRC32)."""
    if source.path.is_file():
        content = source.path
    elif (source.path / EXPORT_WEIGHTS).is_file():
        content = source.path / EXPORT_WEIGHTS
    else:
        content = source.path / MANIFEST
    return {"path": str(source.path.resolve()), "crc32": file_crc(content), "bytes": content.stat().st_size}


def load_legacy(path: Path) -> dict[str, Any]:
    """A single-file checkpoint of an earlier version, read without running pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, wrong format, disallowed pickle: all unusable
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a pixelflow checkpoint (no model/config entries)")
    return state


def check_export_destination(destination: Path, force: bool = False) -> None:
    """Refuse a destination where an export would shadow checkpoints (sampling and resume read a folder's
    model.safetensors before its checkpoints), an existing export unless forced, and unwritable places."""
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise CheckpointError(f"{destination}: a file, not a folder to export into")
    if (
        (destination / "checkpoints").is_dir()
        or (destination / MANIFEST).is_file()
        or destination.name == "checkpoints"
    ):
        raise CheckpointError(
            f"{destination}: a run directory or checkpoint folder: an export there would hide its checkpoints; "
            f"export into a folder of its own"
        )
    if (destination / EXPORT_WEIGHTS).exists() and not force:
        raise CheckpointError(f"{destination}: already holds an export; --force replaces it")
    if not writable(destination):
        raise CheckpointError(f"{destination}: cannot be written there")


def write_export(
    destination: Path, weights: dict[str, torch.Tensor], cfg: Config, origin: str, force: bool = False
) -> Path:
    """Consolidated weights as safetensors plus the config: what sampling and fine-tuning need. Each file is
    written under a temporary name and renamed, so a replaced export is never half old, half new."""
    from safetensors.torch import save_file

    check_export_destination(destination, force)
    destination.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in weights.items()}
    save_file(tensors, destination / f".{EXPORT_WEIGHTS}.tmp", metadata={"origin": origin})
    _write_file(destination / f".{CONFIG}.tmp", to_yaml(cfg))
    os.replace(destination / f".{CONFIG}.tmp", destination / CONFIG)
    os.replace(destination / f".{EXPORT_WEIGHTS}.tmp", destination / EXPORT_WEIGHTS)
    return destination


def export(source: Path, destination: Path, which: str = "ema", force: bool = False) -> Path:
    check_export_destination(destination, force)  # before reading gigabytes of weights
    weights, cfg = read_weights(source, which)
    return write_export(Path(destination), weights, cfg, f"{source} ({which})", force)
