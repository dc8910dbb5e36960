"""Raw images (+ captions, labels) -> shards in the pixelflow format, on local disk or S3.

Inputs (kind detected when not given):
- `imagefolder`: INPUT/<class>/<image>, ImageNet style; label = class index in sorted order, caption = class.
- `captioned`: images anywhere under INPUT with a sidecar `<stem>.txt` caption.
- `table`: a .parquet, .jsonl or .csv with an image path column (image|path|image_path|file|filename),
  a caption column (caption|text|prompt) and optionally a label column (label|class|class_id); relative
  paths are read from the table's directory.

Every input is either written or skipped with a reason; `written + sum(skipped) = inputs`. Shard i always
holds the same inputs (fixed by input order), so a rerun skips shards that are complete (index written,
after the tar) and redoes only the rest. Keys are sanitised to letters, digits, '_' and '-', so no tar
member can escape its directory.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from pixelflow.data.shard_format import (
    Manifest,
    ShardInfo,
    ShardWriter,
    index_name,
    shard_name,
    write_json_atomically,
)
from pixelflow.data.storage import filesystem, storage_options, with_retries

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KINDS = ("imagefolder", "captioned", "table")
TABLE_SUFFIXES = {".parquet", ".jsonl", ".csv"}
PATH_COLUMNS = ("image", "path", "image_path", "file", "filename")
CAPTION_COLUMNS = ("caption", "text", "prompt")
LABEL_COLUMNS = ("label", "class", "class_id")


class IngestError(ValueError):
    """The input as a whole cannot be ingested (not a single bad sample); the message says why."""


@dataclass(frozen=True)
class Item:
    key: str
    source: str
    caption: str | None
    label: int | None
    problem: str | None = None  # a reason to skip found while listing (e.g. missing_caption)


@dataclass(frozen=True)
class Options:
    per_shard: int = 1000
    shard_bytes: int = 0  # when > 0, group inputs by source bytes instead of count
    min_size: int = 64
    max_aspect: float = 4.0
    max_side: int = 0  # 0 = keep the size
    quality: int = 95
    reencode: bool = False
    max_pixels: int = 50_000_000  # larger images are skipped (too_many_pixels), judged from the header


@dataclass
class Report:
    inputs: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_reused: int = 0
    seconds: float = 0.0

    def add(self, part: dict) -> None:
        self.written += part["written"]
        self.skipped = dict(Counter(self.skipped) + Counter(part["skipped"]))
        self.converted = dict(Counter(self.converted) + Counter(part["converted"]))


def sanitize_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text).strip("_") or "sample"


def detect_kind(source: Path) -> str:
    """table for a file; captioned when images have sidecar captions; imagefolder for class folders."""
    if source.is_file():
        if source.suffix.lower() in TABLE_SUFFIXES:
            return "table"
        raise IngestError(f"{source}: a file input must be a table (.parquet, .jsonl or .csv)")
    if not source.is_dir():
        raise IngestError(f"{source}: input not found")
    images = _images_under(source)
    if any(path.with_suffix(".txt").exists() for path in images):
        return "captioned"
    if any(p.is_dir() for p in source.iterdir()) and not any(path.parent == source for path in images):
        return "imagefolder"
    raise IngestError(f"{source}: neither class folders nor images with .txt captions; give --kind")


def _images_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None, "missing_caption"
    except (UnicodeDecodeError, OSError):
        return None, "bad_caption"
    return (text, None) if text else (None, "missing_caption")


def _table_rows(table: Path) -> list[dict]:
    suffix = table.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(table).to_pylist()
        if suffix == ".jsonl":
            return [json.loads(line) for line in table.read_text(encoding="utf-8").splitlines() if line.strip()]
        with open(table, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except Exception as exc:
        raise IngestError(f"{table}: cannot read the table ({type(exc).__name__}: {exc})") from None


def _column(row_keys, names: tuple[str, ...], table: Path, required: bool) -> str | None:
    for name in names:
        if name in row_keys:
            return name
    if required:
        raise IngestError(f"{table}: no column named any of {', '.join(names)}")
    return None


def list_items(source: Path, kind: str) -> tuple[list[Item], list[str] | None]:
    """Every input in a deterministic order, and the class names for an image folder."""
    if kind == "imagefolder":
        classes = sorted(p.name for p in source.iterdir() if p.is_dir())
        items = [
            Item(sanitize_key(f"{name}-{path.relative_to(source / name).with_suffix('')}"), str(path), name, label)
            for label, name in enumerate(classes)
            for path in _images_under(source / name)
        ]
        return items, classes
    if kind == "captioned":
        items = []
        for path in _images_under(source):
            caption, problem = _read_caption(path.with_suffix(".txt"))
            key = sanitize_key("-".join(path.relative_to(source).with_suffix("").parts))
            items.append(Item(key, str(path), caption, None, problem))
        return items, None
    rows = _table_rows(source)
    if not rows:
        return [], None
    path_column = _column(rows[0].keys(), PATH_COLUMNS, source, required=True)
    caption_column = _column(rows[0].keys(), CAPTION_COLUMNS, source, required=True)
    label_column = _column(rows[0].keys(), LABEL_COLUMNS, source, required=False)
    items = []
    for row in rows:
        listed = Path(str(row.get(path_column) or ""))
        image = listed if listed.is_absolute() else source.parent / listed
        caption = str(row.get(caption_column) or "").strip() or None
        problem = None if caption else "missing_caption"
        label = None
        if label_column is not None and row.get(label_column) not in (None, ""):
            try:
                label = int(row[label_column])
            except (TypeError, ValueError):
                problem = problem or "bad_label"
        items.append(Item(sanitize_key(str(listed.with_suffix(""))), str(image), caption, label, problem))
    return items, None


def mark_duplicates(items: list[Item]) -> list[Item]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item.key in seen and item.problem is None:
            item = Item(item.key, item.source, item.caption, item.label, "duplicate_key")
        seen.add(item.key)
        out.append(item)
    return out


def plan_shards(items: list[Item], options: Options) -> list[list[Item]]:
    """Fixed groups of inputs, by count or by source bytes; the same inputs always give the same shards."""
    if options.shard_bytes <= 0:
        return [items[i : i + options.per_shard] for i in range(0, len(items), options.per_shard)]
    shards, current, size = [], [], 0
    for item in items:
        try:
            item_size = Path(item.source).stat().st_size
        except OSError:
            item_size = 0
        if current and size + item_size > options.shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    return shards + ([current] if current else [])


class Skip(Exception):
    """A sample that is not written; args[0] is the reason."""


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB version of any mode: alpha composited on white, 16-bit scaled to 8, CMYK and palettes converted."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value / 256).convert("L")
    elif mode == "F":
        image = image.convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB"), f"converted_{mode}"


def prepare_image(data: bytes, options: Options) -> tuple[bytes, str, int, int, list[str]]:
    """(encoded bytes, extension, width, height, conversions made); raises Skip(reason)."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.size[0] * image.size[1] > options.max_pixels:  # before decoding: a small file can claim a lot
            raise Skip("too_many_pixels")
        image.load()
    except UnidentifiedImageError:
        raise Skip("not_an_image") from None
    except Image.DecompressionBombError:
        raise Skip("too_large") from None
    except (OSError, ValueError, SyntaxError):
        raise Skip("corrupt") from None
    source_format = (image.format or "").upper()
    conversions = []
    rotated = ImageOps.exif_transpose(image)
    if rotated is not image and (image.getexif().get(0x0112, 1) != 1):
        conversions.append("exif_rotated")
    image = rotated
    image, converted = _to_rgb(image)
    if converted:
        conversions.append(converted)
    width, height = image.size
    if min(width, height) < options.min_size:
        raise Skip("too_small")
    if max(width, height) / min(width, height) > options.max_aspect:
        raise Skip("extreme_aspect")
    if options.max_side and max(width, height) > options.max_side:
        scale = options.max_side / max(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
        width, height = image.size
        conversions.append("resized")
    keep = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(source_format)
    if keep and not conversions and not options.reencode:
        return data, keep, width, height, conversions
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=options.quality)
    if keep != "jpg" or options.reencode:
        conversions.append("reencoded")
    return encoded.getvalue(), "jpg", width, height, conversions


@dataclass(frozen=True)
class ShardJob:
    number: int
    items: list[Item]
    output: str
    storage: dict
    options: Options


def write_shard(job: ShardJob) -> dict:
    """Write one shard (or reuse it if complete); returns its counts and ShardInfo fields."""
    fs, root = filesystem(job.output, **job.storage)
    name = shard_name(job.number)
    report_path = f"{root}/{name[: -len('.tar')]}.report.json"
    if fs.exists(f"{root}/{index_name(name)}"):
        part = json.loads(with_retries(lambda: fs.cat_file(report_path), report_path))
        part["reused"] = True
        return part
    writer = ShardWriter(fs, root, name)
    skipped, converted = Counter(), Counter()
    for item in job.items:
        if item.problem:
            skipped[item.problem] += 1
            continue
        try:
            with open(item.source, "rb") as handle:
                data = handle.read()
            encoded, extension, width, height, conversions = prepare_image(data, job.options)
        except Skip as skip:
            skipped[skip.args[0]] += 1
            continue
        except OSError:
            skipped["unreadable"] += 1
            continue
        converted.update(conversions)
        meta = {"label": item.label, "width": width, "height": height, "source": item.source}
        writer.add(item.key, encoded, extension, item.caption or "", meta)
    info = writer.close_tar()
    labels = [entry.label for entry in writer.entries if entry.label is not None]
    part = {
        "number": job.number,
        "written": info.count,
        "skipped": dict(skipped),
        "converted": dict(converted),
        "shard": asdict(info),
        "max_label": max(labels, default=None),
    }
    write_json_atomically(fs, report_path, json.dumps(part))
    writer.commit()
    return {**part, "reused": False}


def ingest(
    source: str | Path,
    output: str,
    kind: str | None = None,
    options: Options = Options(),
    workers: int = 1,
    endpoint_url: str | None = None,
    progress: bool = True,
    part: tuple[int, int] | None = None,
) -> Report:
    """Ingest `source` into shards under `output` (a directory or s3://bucket/prefix) plus a manifest.
    With part=(i, n), write only every n-th shard from the i-th and no manifest: one task of a job array,
    whose final step (a run without part) reuses every shard and writes the manifest and whole report."""
    started = time.perf_counter()
    source = Path(source)
    kind = kind or detect_kind(source)
    if kind not in KINDS:
        raise IngestError(f"--kind {kind}: must be one of {', '.join(KINDS)}")
    items, classes = list_items(source, kind)
    items = mark_duplicates(items)
    storage = storage_options(output, endpoint_url)
    fs, root = filesystem(output, **storage)
    fs.makedirs(root, exist_ok=True)
    jobs = [ShardJob(n, group, output, storage, options) for n, group in enumerate(plan_shards(items, options))]
    if part is not None:
        jobs = jobs[part[0] :: part[1]]
    report = Report(inputs=sum(len(job.items) for job in jobs))
    sizes = {job.number: len(job.items) for job in jobs}
    infos: dict[int, ShardInfo] = {}
    max_label = None
    bar = tqdm(total=report.inputs, unit="img", disable=not progress, desc="ingest")
    context = multiprocessing.get_context("spawn")  # s3fs clients and their threads do not survive fork
    with context.Pool(workers) if workers > 1 else _InProcess() as pool:
        for written in pool.imap_unordered(write_shard, jobs):
            report.add(written)
            report.shards_reused += written["reused"]
            if written["shard"]["count"]:
                infos[written["number"]] = ShardInfo(**written["shard"])
            if written["max_label"] is not None:
                max_label = max(written["max_label"], max_label if max_label is not None else -1)
            bar.update(sizes[written["number"]])
    bar.close()
    report.shards = len(infos)
    report.seconds = round(time.perf_counter() - started, 3)
    if part is not None:
        return report
    num_classes = len(classes) if classes else (max_label + 1 if max_label is not None else None)
    extra = {"classes": classes} if classes else {}
    manifest = Manifest([infos[n] for n in sorted(infos)], num_classes=num_classes, extra=extra)
    write_json_atomically(fs, f"{root}/manifest.json", manifest.to_json())
    return report


class _InProcess:
    """The Pool interface, run in this process (workers=1: no spawn cost, easier to debug)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def imap_unordered(self, fn, jobs):
        return map(fn, jobs)
