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

Test hook: PIXELFLOW_TEST_STALL_COMMIT=<step>:<seconds> makes rank 0 wait that long before committing
that step's save (every rank's files written, no manifest yet), so tests can kill a run mid-save.
"""

from __future__ import annotations

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

from pixelflow.config import CheckpointConfig, Config, from_yaml, to_yaml
from pixelflow.parallel.world import World

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


def verify(folder: Path) -> None:
    """Raise CheckpointError naming the first file that is missing, truncated or damaged."""
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
            if file_crc(path) != expected["crc32"]:
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


class Checkpointer:
    """Saves and loads the parts of one run, from every rank together."""

    def __init__(self, directory: Path, cfg: CheckpointConfig, world: World, config: Config):
        self.directory, self.cfg, self.world = Path(directory), cfg, world
        self.config_yaml = to_yaml(config)
        use_async = cfg.async_save if cfg.async_save is not None else world.device.type == "cuda"
        # a group of its own: the background thread's collectives must not interleave with training's
        self.group = dist.new_group(backend="gloo") if world.distributed else None
        self.stager = None
        if use_async:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            pinned = world.device.type == "cuda"
            self.stager = DefaultStager(StagingOptions(pinned, False, False, pinned))  # reuses its buffers
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_blocking_s = 0.0  # how long the last save held the step loop

    # -------------------------------------------------------------------------------------- saving

    def save(self, step: int, parts: dict[str, Part], blocking: bool = False) -> None:
        """Save (collective). Asynchronous unless blocking or async saving is off; at most one in flight."""
        started = time.perf_counter()
        self.wait()
        tensors, rest = split_tensors({name: part.state_dict() for name, part in parts.items()})
        temporary = self.directory / f".step_{step:08d}.tmp"
        if self.world.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            _write_file(temporary / STATE, json.dumps(_jsonable(rest), indent=1))
            _write_file(temporary / CONFIG, self.config_yaml)
        self._barrier()
        for part in parts.values():
            if hasattr(part, "save_files"):
                part.save_files(temporary)
        if self.stager is not None and not blocking:
            staged = self.stager.stage(tensors)
            self._thread = threading.Thread(
                target=self._write_in_background, args=(staged, temporary, step), name="checkpoint", daemon=True
            )
            self._thread.start()
        else:
            self._write_and_commit(tensors, temporary, step)
        self.last_blocking_s = time.perf_counter() - started

    def wait(self) -> None:
        """Block until the save in flight is committed; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"{self.directory}: saving a checkpoint failed: {error}") from error

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
            self._write_and_commit(tensors, temporary, step)
        except BaseException as exc:  # re-raised in the training thread by wait()
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
        kept = set(committed[-self.cfg.keep :]) | {newest}
        for folder in committed:
            step = int(folder.name[5:])
            if folder not in kept and not (self.cfg.keep_every and step % self.cfg.keep_every == 0):
                shutil.rmtree(folder, ignore_errors=True)
        for entry in self.directory.iterdir():
            if TEMPORARY.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def _barrier(self) -> None:
        if self.world.distributed:
            dist.barrier(group=self.group)

    # ------------------------------------------------------------------------------------- loading

    def find_resume(self, resume: str) -> ResumeSource | None:
        """What to start from (collective: rank 0 looks, every rank gets its answer or its error)."""
        answer: list[Any] = [None]
        if self.world.is_main:
            try:
                answer[0] = self._choose(resume)
            except CheckpointError as exc:
                answer[0] = exc
        if self.world.distributed:
            dist.broadcast_object_list(answer, src=0, group=self.group)
        if isinstance(answer[0], CheckpointError):
            raise CheckpointError(str(answer[0]))
        return answer[0]

    def _choose(self, resume: str) -> ResumeSource | None:
        committed = committed_checkpoints(self.directory)
        if resume == "none":
            if committed:
                raise CheckpointError(
                    f"{self.directory}: resume=none but the run directory already holds checkpoints "
                    f"(newest {committed[-1].name}); use another run_dir or resume=auto"
                )
            return None
        if resume != "auto":
            return resolve_source(Path(resume))
        problems = []
        for folder in reversed(committed):
            try:
                verify(folder)
            except CheckpointError as exc:
                log.warning("%s; using the previous committed checkpoint", exc)
                problems.append(str(exc))
                continue
            return ResumeSource(folder, True)
        if problems:
            raise CheckpointError(
                f"{self.directory}: checkpoints present but none usable ({'; '.join(problems)}); nothing was changed"
            )
        legacy = legacy_checkpoints(self.directory)
        if legacy:
            raise CheckpointError(
                f"{legacy[-1]}: single-file checkpoint from an earlier version; convert it with "
                f"`pixelflow convert-checkpoint {legacy[-1]}` and train again"
            )
        return None

    def load(self, source: ResumeSource, parts: dict[str, Part]) -> None:
        """Load a whole training state (resharded onto this mesh) or, for weights-only sources, the model
        and EMA (collective)."""
        if not source.full:
            weights, _ = read_weights(source.path, "ema")
            for name in ("model", "ema"):
                parts[name].load_state_dict(weights)
            return
        saved = json.loads((source.path / STATE).read_text())
        missing = [name for name in parts if name not in saved]
        if missing:
            raise CheckpointError(
                f"{source.path}: written by another engine: it has no '{missing[0]}' state "
                f"(it holds {', '.join(sorted(saved))}); resume it with the engine that wrote it"
            )
        tensors, _ = split_tensors({name: part.state_dict() for name, part in parts.items()})
        reader = dcp.FileSystemReader(str(source.path))
        check_shapes(tensors, reader.read_metadata().state_dict_metadata, source.path)
        dcp.load(tensors, storage_reader=reader, process_group=self.group, no_dist=not self.world.distributed)
        for name, part in parts.items():
            part.load_state_dict(join_tensors(saved[name], tensors, name))
            if hasattr(part, "load_files"):
                part.load_files(source.path)


def _stall_if_asked(step: int) -> None:
    stall_step, _, seconds = os.environ.get("PIXELFLOW_TEST_STALL_COMMIT", "").partition(":")
    if stall_step and int(stall_step) == step:
        time.sleep(float(seconds))


def check_shapes(tensors: dict[str, torch.Tensor], saved: dict[str, Any], where: Path) -> None:
    """One line naming the first tensor that this model and the checkpoint disagree on."""
    for key, tensor in tensors.items():
        if key not in saved:
            raise CheckpointError(f"{where}: the checkpoint has no tensor '{key}' (a different model?)")
        shape = list(getattr(saved[key], "size", []))
        if shape != list(tensor.shape):
            raise CheckpointError(
                f"{where}: tensor '{key}' is {shape} in the checkpoint but {list(tensor.shape)} in this model"
            )
    weights = {key.split(SEPARATOR)[0] for key in tensors} & {"model", "ema"}
    for key in saved:
        if key.split(SEPARATOR)[0] in weights and key not in tensors:
            raise CheckpointError(f"{where}: the checkpoint has tensor '{key}' that this model lacks")


# ------------------------------------------------------------------- weights for sampling and fine-tuning


def resolve_source(path: Path) -> ResumeSource:
    """A step folder, a run directory (or its checkpoints/), an export, or an earlier single-file checkpoint."""
    if path.is_file():
        return ResumeSource(path, False)
    if (path / EXPORT_WEIGHTS).is_file():
        return ResumeSource(path, False)
    if (path / MANIFEST).is_file():
        verify(path)
        return ResumeSource(path, True)
    for directory in (path / "checkpoints", path):
        committed = committed_checkpoints(directory)
        if committed:
            verify(committed[-1])
            return ResumeSource(committed[-1], True)
        legacy = legacy_checkpoints(directory)
        if legacy:
            return ResumeSource(legacy[-1], False)
    raise CheckpointError(
        f"{path}: no checkpoint found (expected a run directory, a step_NNNNNNNN folder or an export)"
    )


def read_weights(path: Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], Config]:
    """(full float32 weights, config) from any checkpoint `resolve_source` accepts; `which` is ema|model."""
    source = resolve_source(Path(path))
    if source.path.is_file():
        state = load_legacy(source.path)
        return state[which], from_yaml(state["config"], unset_env_ok=True)
    if (source.path / EXPORT_WEIGHTS).is_file():
        from safetensors.torch import load_file

        cfg = from_yaml((source.path / CONFIG).read_text(), unset_env_ok=True)
        return load_file(source.path / EXPORT_WEIGHTS), cfg
    from pixelflow.model import PixelFlowTransformer

    cfg = from_yaml((source.path / CONFIG).read_text(), unset_env_ok=True)
    with torch.device("meta"):
        names = list(PixelFlowTransformer(cfg.model).state_dict().items())
    template = {f"{which}{SEPARATOR}{name}": torch.empty(t.shape, dtype=torch.float32) for name, t in names}
    reader = dcp.FileSystemReader(str(source.path))
    check_shapes(template, {k: v for k, v in reader.read_metadata().state_dict_metadata.items()}, source.path)
    dcp.load(template, storage_reader=reader, no_dist=True)
    return {key.split(SEPARATOR, 1)[1]: tensor for key, tensor in template.items()}, cfg


def load_legacy(path: Path) -> dict[str, Any]:
    """A single-file checkpoint of an earlier version, read without running pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, wrong format, disallowed pickle: all unusable
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a pixelflow checkpoint (no model/config entries)")
    return state


def write_export(destination: Path, weights: dict[str, torch.Tensor], cfg: Config, origin: str) -> Path:
    """Consolidated weights as safetensors plus the config: what sampling and fine-tuning need."""
    from safetensors.torch import save_file

    destination.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in weights.items()}
    save_file(tensors, destination / EXPORT_WEIGHTS, metadata={"origin": origin})
    (destination / CONFIG).write_text(to_yaml(cfg))
    return destination


def export(source: Path, destination: Path, which: str = "ema") -> Path:
    weights, cfg = read_weights(source, which)
    return write_export(Path(destination), weights, cfg, f"{source} ({which})")
