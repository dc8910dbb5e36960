"""`pixelflow-data index SOURCE [--meta DEST]`: adopt existing webdataset tars as a dataset, in place.

img2dataset output (`00000.tar` with `NNNN.jpg/.txt/.json`) and `webdataset.ShardWriter` tars train as
they are: nothing is copied and the tars are not touched (only read). For every tar an index
(`NAME.index.json`: each sample's key, byte range, image size, label) is written beside the tars or under
`--meta` (local or S3), then the manifest, which records where the tars are (`location`) when they live
elsewhere, and the filters used. The loader then reads the tars from there with ranged reads, exactly as
it reads its own shards, so resume and "N ranks = 1 process" hold over data it did not write.

Keys follow webdataset (the member path up to the first dot of its file name, folders included). A sample
takes its first image member (jpg, jpeg, png or webp); its width and height come from its `.json` when
that has them (img2dataset's does; checked against the image header on every `verify_every`-th sample,
and a shard where they disagree is read from the headers), else from the image header. Labels come from a
`.cls` member or `--label-field` of the json, captions from `.txt` or `--caption-field`.

Each tar's index records the tar's fingerprint (size, and ETag or mtime) and the options; a rerun reuses
an index whose tar and options are unchanged and indexes a changed tar again. Every sample read is
either indexed or counted by reason (written + skipped = inputs); a truncated or unreadable tar keeps every
sample before the one being read when the damage is met, and counts that one as `truncated_tar`.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import operator
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import braceexpand
from PIL import Image

from data_tools.ingest import IngestError, _InProcess
from pixelflow.data.shard_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    Manifest,
    SampleEntry,
    ShardInfo,
    index_name,
    member_key,
    readable_key,
    write_json_atomically,
)
from pixelflow.data.storage import filesystem
from pixelflow.progress import Progress

SHARD_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*\.tar$")
CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.eE+-]+)\s*$")
COMPARE = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class IndexOptions:
    caption_field: str | None = None  # captions from this .json field (default: the .txt member)
    label_field: str | None = None  # labels from this .json field (default: the .cls member)
    num_classes: int | None = None  # default: 1 + the largest label found
    min_size: int = 0  # skip images with a shorter side below this
    max_aspect: float = 0.0  # skip images whose longer / shorter side is above this; 0 = no limit
    where: tuple[str, ...] = ()  # numeric conditions on json fields, e.g. "punsafe<0.5"; all must hold
    verify_every: int = 64  # json width/height checked against the image header on every this-many-th sample

    def conditions(self) -> list[tuple[str, str, float]]:
        """(field, operator, number) of every --where, or one error line naming the bad one."""
        out = []
        for text in self.where:
            match = CONDITION.match(text)
            if match is None:
                raise IngestError(f"--where {text!r}: must be FIELD OP NUMBER with OP one of < <= > >= == !=")
            out.append((match.group(1), match.group(2), float(match.group(3))))
        return out


@dataclass
class IndexReport:
    inputs: int = 0  # samples found in the tars
    written: int = 0  # samples indexed
    skipped: dict[str, int] = field(default_factory=dict)
    shards: int = 0  # tars in the dataset (with at least one sample)
    shards_reused: int = 0  # indexes kept from an earlier run (tar and options unchanged)
    bytes: int = 0  # of the tars
    seconds: float = 0.0


def place(path: str, storage_options: dict) -> tuple:
    """(filesystem, path in it): the storage options are the object store's, a local path takes none."""
    return filesystem(path, **(storage_options if "://" in path else {}))


def resolve_tars(source: str, storage_options: dict) -> tuple[str, list[str]]:
    """(the folder holding the tars, their names) for a folder, a brace pattern or a list file (one tar
    path per line). The tars must share one folder: the manifest names them relative to it."""
    if source.endswith((".txt", ".list")) and "{" not in source:
        fs, path = place(source, storage_options)
        if not fs.isfile(path):
            raise IngestError(f"{source}: list file not found")
        text = fs.cat_file(path).decode()  # pyright: ignore[reportAttributeAccessIssue] (cat_file returns bytes)
        paths = [line.strip() for line in text.splitlines() if line.strip()]
    elif "{" in source:
        paths = list(braceexpand.braceexpand(source))
    else:
        fs, path = place(source, storage_options)
        if not fs.isdir(path):
            raise IngestError(f"{source}: input not found (a folder of tars, a brace pattern or a list file)")
        prefix = source.rstrip("/")
        paths = [f"{prefix}/{name.rsplit('/', 1)[-1]}" for name in sorted(fs.ls(path, detail=False))]
        paths = [p for p in paths if p.endswith(".tar")]
    if not paths:
        raise IngestError(f"{source}: no .tar files there")
    folders = {p.rsplit("/", 1)[0] if "/" in p else "." for p in paths}
    if len(folders) > 1:
        raise IngestError(f"{source}: the tars must share one folder (found {len(folders)}: {sorted(folders)[:2]})")
    names = [p.rsplit("/", 1)[-1] for p in paths]
    bad = [n for n in names if not SHARD_NAME.match(n)]
    if bad:
        raise IngestError(f"{source}: {bad[0]!r} is not a tar name the manifest can hold (letters, digits, _ . -)")
    return folders.pop(), names


@dataclass(frozen=True)
class TarJob:
    folder: str  # where the tar is
    name: str
    meta: str  # where its index goes
    storage_options: dict
    options: IndexOptions


def fingerprint(job: TarJob) -> dict:
    """What the index depends on: the tar's size and ETag (or mtime), and the options."""
    fs, path = place(f"{job.folder}/{job.name}", job.storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise IngestError(f"{job.folder}/{job.name}: tar not found") from None
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    options = hashlib.sha256(json.dumps(asdict(job.options), sort_keys=True).encode()).hexdigest()[:16]
    return {"size": int(info["size"]), "version": str(version), "options": options}


def index_tar(job: TarJob) -> dict:
    """Index one tar (or reuse its index): the part of the report it adds and its ShardInfo."""
    source = fingerprint(job)
    meta_fs, meta_root = place(job.meta, job.storage_options)
    index_path = f"{meta_root}/{index_name(job.name)}"
    try:
        saved = json.loads(meta_fs.cat_file(index_path))
        if saved.get("source") == source:
            return {**saved["report"], "reused": True}
    except (FileNotFoundError, ValueError, KeyError, AttributeError):
        pass
    entries, counts, inputs = scan_tar(job, verify_all=False)
    if entries is None:  # the json sizes disagreed with the headers: read every header
        entries, counts, inputs = scan_tar(job, verify_all=True)
    assert entries is not None  # with every header read, sizes cannot disagree
    labels = [e.label for e in entries if e.label is not None]
    report = {
        "name": job.name,
        "count": len(entries),
        "bytes": source["size"],
        "inputs": inputs,
        "skipped": dict(counts),
        "max_label": max(labels) if labels else None,
    }
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "shard": job.name,
        "bytes": source["size"],
        "samples": [asdict(e) for e in entries],
        "source": source,
        "report": report,
    }
    write_json_atomically(meta_fs, index_path, json.dumps(index))
    return {**report, "reused": False}


def scan_tar(job: TarJob, verify_all: bool) -> tuple[list[SampleEntry] | None, Counter, int]:
    """(entries, skipped counts, samples seen) of one tar, streamed once; entries None when a json size
    disagreed with its image header and verify_all is off."""
    fs, path = place(f"{job.folder}/{job.name}", job.storage_options)
    entries: list[SampleEntry] = []
    counts: Counter = Counter()
    inputs = 0
    current: dict | None = None
    conditions = job.options.conditions()

    def finish(sample: dict | None) -> bool:
        nonlocal inputs
        if sample is None:
            return True
        inputs += 1
        verify = None if verify_all else inputs % job.options.verify_every == 1
        entry, problem = judge(sample, job.options, conditions, verify)
        if problem == "size_mismatch" and not verify_all:
            return False
        if problem:
            counts[problem] += 1
        elif entry is not None:
            entries.append(entry)
        return True

    with fs.open(path, "rb") as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|") as tar:  # pyright: ignore[reportCallIssue, reportArgumentType] (a binary fsspec file)
                for info in tar:
                    if not info.isfile():
                        continue
                    key, extension = member_key(info.name)
                    end = info.offset_data + -(-info.size // 512) * 512
                    if current is None or key != current["key"]:
                        if not finish(current):
                            return None, counts, inputs
                        current = {"key": key, "offset": info.offset, "end": end, "members": {}}
                    current["end"] = end
                    wanted = extension in IMAGE_EXTENSIONS or extension in ("json", "cls", "txt")
                    if wanted and extension not in current["members"]:
                        member = tar.extractfile(info)
                        current["members"][extension] = member.read() if member is not None else b""
        except (tarfile.TarError, EOFError, OSError):
            inputs += 1  # the sample being read (more of its members may have followed) is lost; those before stand
            counts["truncated_tar"] += 1
            current = None
    if not finish(current):
        return None, counts, inputs
    return entries, counts, inputs


def judge(
    sample: dict, options: IndexOptions, conditions: list[tuple[str, str, float]], verify: bool | None
) -> tuple[SampleEntry | None, str | None]:
    """(its index entry, None) or (None, why it is skipped). verify: check the json's size against the
    image header (a mismatch is "size_mismatch"); None: take every size from the header."""
    members, key = sample["members"], sample["key"]
    if not readable_key(key):
        return None, "bad_key"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        return None, "missing_image"
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            return None, "bad_json"
        if not isinstance(meta, dict):
            return None, "bad_json"
    width, height = meta.get("width"), meta.get("height")
    sized = isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0 and verify is not None
    if not sized or verify:
        try:
            header = Image.open(io.BytesIO(members[image_ext])).size
        except Exception:  # Pillow raises many kinds for a broken file: all mean the same here
            return None, "corrupt_image"
        if sized and header != (width, height):
            return None, "size_mismatch"
        width, height = header
    assert isinstance(width, int) and isinstance(height, int)
    if min(width, height) < options.min_size:
        return None, "too_small"
    if options.max_aspect and max(width, height) / min(width, height) > options.max_aspect:
        return None, "too_elongated"
    for name, op, number in conditions:  # options.conditions(), parsed once per tar
        value = meta.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not COMPARE[op](value, number):
            return None, f"where_{name}"
    label, problem = sample_label(members, meta, options)
    if problem:
        return None, problem
    end = sample["end"]
    return SampleEntry(key, sample["offset"], end - sample["offset"], image_ext, width, height, label), None


def sample_label(members: dict, meta: dict, options: IndexOptions) -> tuple[int | None, str | None]:
    """(label or None, problem): from --label-field of the json, else a .cls member, else none."""
    if options.label_field:
        value = meta.get(options.label_field)
    elif "cls" in members:
        try:
            value = int(members["cls"].decode().strip())
        except ValueError:
            return None, "bad_label"
    else:
        return None, None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None, "bad_label"
    if options.num_classes is not None and value >= options.num_classes:
        return None, "label_out_of_range"
    return value, None


def index_dataset(
    source: str,
    meta: str | None = None,
    options: IndexOptions = IndexOptions(),
    *,
    workers: int = 1,
    storage_options: dict | None = None,
    progress: bool = False,
    part: tuple[int, int] | None = None,
) -> IndexReport:
    """Index the tars of `source` into `meta` (default: beside them) and write the manifest there. With
    part=(i, n), index every n-th tar from the i-th and write no manifest (one task of a SLURM array)."""
    started = time.perf_counter()
    storage_options = storage_options or {}
    options.conditions()  # a bad --where is refused before any tar is read
    folder, names = resolve_tars(source, storage_options)
    meta = (meta or folder).rstrip("/")
    meta_fs, meta_root = place(meta, storage_options)
    meta_fs.makedirs(meta_root, exist_ok=True)
    jobs = [TarJob(folder, name, meta, storage_options, options) for name in names]
    if part is not None:
        jobs = jobs[part[0] :: part[1]]
    report = IndexReport()
    infos: dict[str, ShardInfo] = {}
    max_label = None
    context = multiprocessing.get_context("spawn")  # s3fs clients and their threads do not survive fork
    with Progress(len(jobs), "index", "tar", enabled=progress) as bar:
        with context.Pool(workers) if workers > 1 else _InProcess() as pool:
            for done in pool.imap_unordered(index_tar, jobs):
                report.inputs += done["inputs"]
                report.written += done["count"]
                report.skipped = dict(Counter(report.skipped) + Counter(done["skipped"]))
                report.shards_reused += done["reused"]
                report.bytes += done["bytes"]
                if done["count"]:
                    infos[done["name"]] = ShardInfo(done["name"], done["count"], done["bytes"])
                if done["max_label"] is not None:
                    max_label = max(done["max_label"], -1 if max_label is None else max_label)
                bar.update(1)
    report.shards = len(infos)
    report.seconds = round(time.perf_counter() - started, 3)
    if part is not None:
        return report
    if not infos:
        raise IngestError(
            f"{source}: nothing indexed: {report.inputs} samples in {len(names)} tars, none usable "
            f"({', '.join(f'{k} {v}' for k, v in sorted(report.skipped.items())) or 'no samples'})"
        )
    num_classes = (
        options.num_classes if options.num_classes is not None else (max_label + 1 if max_label is not None else None)
    )
    location = None if absolute(meta) == absolute(folder) else absolute(folder)
    filters = {k: v for k, v in asdict(options).items() if k not in ("verify_every",) and v not in (None, 0, 0.0, ())}
    manifest = Manifest(
        [infos[name] for name in names if name in infos],
        num_classes=num_classes,
        extra={"adopted": {"source": absolute(folder), "filters": filters}},
        location=location,
        caption_field=options.caption_field,
    )
    write_json_atomically(meta_fs, f"{meta_root}/{MANIFEST_NAME}", manifest.to_json())
    return report


def absolute(folder: str) -> str:
    """A folder as the manifest records it: a URL as given, a local path made absolute."""
    if "://" in folder:
        return folder.rstrip("/")
    return os.path.abspath(folder)
