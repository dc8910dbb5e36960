"""The on-disk checkpoint format and everything that reads or writes it outside training: step folders and
their commit record, verification, resume sources, weights for sampling, exports, and the single-file
checkpoints of earlier versions. Nothing here is collective or imports the trainer, so sampling, eval and
conversion stand on it alone (train/checkpoint.py's Checkpointer writes and loads the same format).

A checkpoint is one folder `<run_dir>/checkpoints/step_NNNNNNNN/`:

    .metadata, __R_I.distcp   every tensor of every part, written by all ranks in parallel (DCP)
    state.json                everything else (step, data cursors, LR schedule, optimizer hyper-parameters)
    config.yaml               the run's config
    deepspeed/                DeepSpeed's own save, for that engine only
    manifest.json             size and CRC32 of every file above: written last, it is the commit record

Tensor keys are the part's name and the tensor's path through its nested state joined by SEPARATOR
(`model/blocks.0.attn.q_proj.weight`). A folder without its manifest is not a checkpoint. An export is a
folder holding model.safetensors and config.yaml.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from pixelflow.config import Config, ModelConfig, from_yaml, to_yaml
from pixelflow.errors import CheckpointError
from pixelflow.paths import writable

# DCP warns on every single-process save and load, which is what one process without a group means here
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
COMMITTED = re.compile(r"^step_(\d{8})$")
TEMPORARY = re.compile(r"^\.step_\d{8}\.(tmp|old)$")
LEGACY = re.compile(r"^step_(\d{8})\.pt$")
MANIFEST, STATE, CONFIG = "manifest.json", "state.json", "config.yaml"
CRC = ".crc-"  # each rank's share of the checksums, merged into the manifest at commit
EXPORT_WEIGHTS = "model.safetensors"
SEPARATOR = "/"  # joins a tensor's path through the nested state into its DCP key (names contain dots)


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


def fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_durably(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


@dataclass(frozen=True)
class ResumeSource:
    path: Path
    full: bool  # True: the whole training state (a step folder); False: weights only (export, old file)


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
    return {key: list(meta.size) for key, meta in metadata.items() if isinstance(meta, TensorStorageMetadata)}


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
    write_durably(destination / f".{CONFIG}.tmp", to_yaml(cfg))
    os.replace(destination / f".{CONFIG}.tmp", destination / CONFIG)
    os.replace(destination / f".{EXPORT_WEIGHTS}.tmp", destination / EXPORT_WEIGHTS)
    return destination


def export(source: Path, destination: Path, which: str = "ema", force: bool = False) -> Path:
    check_export_destination(destination, force)  # before reading gigabytes of weights
    weights, cfg = read_weights(source, which)
    return write_export(Path(destination), weights, cfg, f"{source} ({which})", force)
