"""Raw images (+ captions, labels) -> shards in the pixelflow format, on local disk or S3.

Inputs (kind detected when not given):
- `imagefolder`: INPUT/<class>/<image>, ImageNet style; label = class index in sorted order, caption = class.
- `captioned`: images anywhere under INPUT with a sidecar `<stem>.txt` caption.
- `table`: a .parquet, .jsonl or .csv, a folder of them or a glob (`data/train-*.parquet`), with an image
  column (image|path|image_path|file|filename) holding a path (relative ones are read from the table's
  directory), an `s3://` URL (read through fsspec), the image's bytes (a binary column) or the Hugging
  Face Hub layout (`image: struct<bytes, path>`); a caption column (caption|text|prompt), which may be
  absent when there is a label column (label|class|class_id). Class names come from `--class-names` or
  the Hub's ClassLabel metadata. Parquet is read one row group at a time: memory stays bounded.

Every input is either written or skipped with a reason; `written + sum(skipped) = inputs`. Shard i always
holds the same inputs (fixed by input order), so a rerun skips shards that are complete (index written,
after the tar) and redoes only the rest. Keys are sanitised to letters, digits, '_' and '-', so no tar
member can escape its directory.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from pixelflow.data.decode import DEFAULT_MAX_PIXELS
from pixelflow.data.shard_format import (
    Manifest,
    ShardInfo,
    ShardWriter,
    index_name,
    shard_name,
    write_json_atomically,
)
from pixelflow.data.storage import filesystem, storage_options, with_retries
from pixelflow.progress import Progress

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
    cell: tuple[str, int, int, str] | None = None  # bytes inside a parquet: (file, row group, row, column)


@dataclass(frozen=True)
class Options:
    per_shard: int = 1000
    shard_bytes: int = 0  # when > 0, group inputs by source bytes instead of count
    min_size: int = 64
    max_aspect: float = 4.0
    max_side: int = 0  # 0 = keep the size
    quality: int = 95
    reencode: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped (too_many_pixels), judged from the header
    max_file_mb: float = 256.0  # larger input files are skipped (too_large_file) without being read
    allow_outside_root: bool = False  # read inputs (or captions) that resolve outside the input root
    class_names: tuple[str, ...] = ()  # a table's class names, by label (default: the Hub's metadata)


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
    if any(c in str(source) for c in "*?["):
        return "table"  # a glob of tables
    if source.is_file():
        if source.suffix.lower() in TABLE_SUFFIXES:
            return "table"
        raise IngestError(f"{source}: a file input must be a table (.parquet, .jsonl or .csv)")
    if not source.is_dir():
        raise IngestError(f"{source}: input not found")
    images = _images_under(source)
    if not images and any(p.suffix.lower() in TABLE_SUFFIXES for p in source.iterdir()):
        return "table"  # a folder of tables
    if any(path.with_suffix(".txt").exists() for path in images):
        return "captioned"
    if any(p.is_dir() for p in source.iterdir()) and not any(path.parent == source for path in images):
        return "imagefolder"
    raise IngestError(f"{source}: neither class folders nor images with .txt captions; give --kind")


def _images_under(directory: Path) -> list[Path]:
    """Every entry named like an image (files, links, FIFOs, folders...): what is not a regular file inside the
    root is skipped and counted later, so written + skipped = inputs covers everything found."""
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _inside(path: Path, root: Path) -> bool:
    """Whether path, links resolved, lies inside root (links resolved)."""
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(root)))


def input_problem(path: Path, root: Path, options: Options) -> str | None:
    """Why an input path cannot be read as an image file, or None; nothing is opened."""
    if not options.allow_outside_root and not _inside(path, root):
        return "outside_root"
    try:
        status = path.stat()
    except OSError:
        return "unreadable"
    if not stat.S_ISREG(status.st_mode):
        return "not_a_file"  # folders, FIFOs (reading one hangs), devices (/dev/zero never ends)
    if status.st_size > options.max_file_mb * 2**20:
        return "too_large_file"
    return None


def _read_caption(path: Path, root: Path, options: Options) -> tuple[str | None, str | None]:
    if not path.exists() and not path.is_symlink():
        return None, "missing_caption"
    problem = input_problem(path, root, options)
    if problem:
        return None, problem
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError):
        return None, "bad_caption"
    return (text, None) if text else (None, "missing_caption")


def _caption_problem(caption: str | None) -> str | None:
    try:
        (caption or "").encode("utf-8")  # a lone surrogate (from JSON "\\ud800") cannot be stored
    except UnicodeEncodeError:
        return "bad_caption"
    return None


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


def list_items(source: Path, kind: str, options: Options = Options()) -> tuple[list[Item], list[str] | None]:
    """Every input in a deterministic order, and the class names for an image folder. Inputs are judged
    here from their paths (outside the root, not a regular file, too large) and skipped with a reason."""
    if kind == "imagefolder":
        classes = sorted(p.name for p in source.iterdir() if p.is_dir())
        items = [
            Item(
                sanitize_key(f"{name}-{path.relative_to(source / name).with_suffix('')}"),
                str(path),
                name,
                label,
                input_problem(path, source, options),
            )
            for label, name in enumerate(classes)
            for path in _images_under(source / name)
        ]
        return items, classes
    if kind == "captioned":
        items = []
        for path in _images_under(source):
            caption, problem = _read_caption(path.with_suffix(".txt"), source, options)
            key = sanitize_key("-".join(path.relative_to(source).with_suffix("").parts))
            items.append(Item(key, str(path), caption, None, input_problem(path, source, options) or problem))
        return items, None
    return table_items(source, options)


def list_remote_items(
    url: str, kind: str | None, options: Options, storage: dict, scratch: str
) -> tuple[list[Item], list[str] | None]:
    """The inputs of a class folder, captioned folder or table on an object store (s3://), listed through
    fsspec: images become URL inputs that the shard workers read; sidecar captions are read here. A table is
    copied into `scratch` (a folder that lives as long as the ingest)."""
    fs, root = filesystem(url, **storage)
    scheme = url.split("://")[0] + "://"
    if fs.isfile(root):
        if Path(root).suffix.lower() not in TABLE_SUFFIXES:
            raise IngestError(f"{url}: a file input must be a table (.parquet, .jsonl or .csv)")
        local = Path(scratch) / Path(root).name  # tables are small beside their images: read as a local one
        fs.get(root, str(local))
        items, classes = table_items(local, options)
        base = url.rsplit("/", 1)[0]
        return [remote_row(item, local, base) for item in items], classes
    if not fs.isdir(root):
        raise IngestError(f"{url}: input not found")
    listing: dict = fs.find(root, detail=True)  # pyright: ignore[reportAssignmentType] (detail=True: a dict)
    found = {path: info for path, info in sorted(listing.items()) if info.get("type") == "file"}
    images = [path for path in found if Path(path).suffix.lower() in IMAGE_SUFFIXES]
    sidecars = {path for path in found if path.endswith(".txt")}
    if kind is None:
        captioned = any(str(Path(path).with_suffix(".txt")) in sidecars for path in images)
        in_folders = bool(images) and all("/" in path[len(root) + 1 :] for path in images)
        kind = "captioned" if captioned else "imagefolder" if in_folders else None
        if kind is None:
            raise IngestError(f"{url}: neither class folders nor images with .txt captions; give --kind")
    if kind not in ("imagefolder", "captioned"):
        raise IngestError(f"--kind {kind}: an s3:// folder holds imagefolder or captioned inputs")

    def too_large(path: str) -> str | None:
        return "too_large_file" if found[path].get("size", 0) > options.max_file_mb * 2**20 else None

    if kind == "imagefolder":
        by_class: dict[str, list[tuple[str, str]]] = {}  # class -> (object path, path inside the class), one pass
        for path in images:
            name, _, inside = path[len(root) + 1 :].partition("/")
            if inside:
                by_class.setdefault(name, []).append((path, inside))
        classes = sorted(by_class)
        items = [
            Item(sanitize_key(f"{name}-{Path(inside).with_suffix('')}"), scheme + path, name, label, too_large(path))
            for label, name in enumerate(classes)
            for path, inside in by_class[name]
        ]
        return items, classes
    wanted = [str(Path(path).with_suffix(".txt")) for path in images]
    present = [w for w in wanted if w in sidecars]
    texts: dict = fs.cat(present) if present else {}  # pyright: ignore[reportAssignmentType] (a list in: a dict out)
    items = []
    for path, sidecar in zip(images, wanted):
        caption = texts[sidecar].decode("utf-8", "replace").strip() or None if sidecar in texts else None
        key = sanitize_key("-".join(Path(path[len(root) + 1 :]).with_suffix("").parts))
        problem = too_large(path) or _caption_problem(caption) or (None if caption else "missing_caption")
        items.append(Item(key, scheme + path, caption, None, problem))
    return items, None


def remote_row(item: Item, table: Path, base: str) -> Item:
    """A row of a table read from an object store: relative image paths are objects beside the table."""
    if item.cell is not None or "://" in item.source or not item.source:
        return item
    relative = os.path.relpath(item.source, table.parent)
    if relative.startswith(".."):
        return Item(item.key, item.source, item.caption, item.label, "outside_root")
    return Item(item.key, f"{base}/{relative}", item.caption, item.label, None)


def table_files(source: Path) -> list[Path]:
    """The tables of a table input: the file, a folder's tables or a glob's matches, in name order."""
    if any(c in str(source) for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(source)))
    elif source.is_dir():
        files = sorted(source.iterdir())
    else:
        files = [source]
    files = [f for f in files if f.suffix.lower() in TABLE_SUFFIXES and f.is_file()]
    if not files:
        raise IngestError(f"{source}: no tables there (.parquet, .jsonl or .csv)")
    return files


def table_rows(table: Path) -> Iterator[tuple[object, tuple[int, int] | None]]:
    """Each row of a table with its (row group, row) in a parquet file; parquet is read one row group at a
    time, so a table of image bytes never sits in memory whole."""
    if table.suffix.lower() != ".parquet":
        for row in _table_rows(table):
            yield row, None
        return
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(table)
    except Exception as exc:
        raise IngestError(f"{table}: cannot read the table ({type(exc).__name__}: {exc})") from None
    for group in range(parquet.num_row_groups):
        for row, record in enumerate(parquet.read_row_group(group).to_pylist()):
            yield record, (group, row)


def hub_class_names(table: Path, column: str | None) -> list[str] | None:
    """The class names a Hugging Face Hub parquet declares for its label column (ClassLabel), if any."""
    if column is None or table.suffix.lower() != ".parquet":
        return None
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(table).schema_arrow.metadata or {}
    try:
        feature = json.loads(metadata[b"huggingface"])["info"]["features"][column]
    except (KeyError, ValueError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(name) for name in names] if isinstance(names, list) else None


def table_items(source: Path, options: Options) -> tuple[list[Item], list[str] | None]:
    """The rows of every table of `source` as inputs: the image as a path, a URL or bytes in the table."""
    items: list[Item] = []
    columns: tuple[str | None, str | None, str | None] | None = None
    classes = list(options.class_names) or None
    number = -1
    for table in table_files(source):
        for row, position in table_rows(table):
            number += 1
            if not isinstance(row, dict):
                items.append(Item(f"row-{number}", "", None, None, "bad_row"))
                continue
            if columns is None:  # the first table's columns name every table's
                path_column = _column(row.keys(), PATH_COLUMNS, table, required=True)
                label_column = _column(row.keys(), LABEL_COLUMNS, table, required=False)
                caption_column = _column(row.keys(), CAPTION_COLUMNS, table, required=label_column is None)
                columns = (path_column, caption_column, label_column)
                classes = classes or hub_class_names(table, label_column)
            items.append(table_item(row, columns, table, position, number, options))  # pyright: ignore[reportArgumentType] (set above)
    return items, classes


def table_item(
    row: dict, columns: tuple, table: Path, position: tuple[int, int] | None, number: int, options: Options
) -> Item:
    path_column, caption_column, label_column = columns
    value, cell, problem = row.get(path_column), None, None
    if isinstance(value, dict) or isinstance(value, (bytes, bytearray)):  # the image itself is in the table
        inline = value.get("bytes") if isinstance(value, dict) else value
        listed = (value.get("path") if isinstance(value, dict) else None) or f"{table.stem}-{number}"
        source = f"{table}#{number}"
        if position is None or not inline:
            problem = "empty_image"
        else:
            cell = (str(table), position[0], position[1], path_column)
    else:
        listed = str(value or "").strip()
        if not listed:
            return Item(f"row-{number}", "", None, None, "empty_path")
        if "://" in listed:  # an object store: read through fsspec by the shard's worker
            source = listed
        else:
            image = Path(listed) if Path(listed).is_absolute() else table.parent / listed
            source, problem = str(image), input_problem(image, table.parent, options)
    caption = str(row.get(caption_column) or "").strip() or None if caption_column else None
    problem = problem or _caption_problem(caption)
    if caption_column:  # a table without captions (a label column instead) trains class-conditionally
        problem = problem or (None if caption else "missing_caption")
    label = None
    if label_column is not None and row.get(label_column) not in (None, ""):
        try:
            label = int(row[label_column])
        except (TypeError, ValueError):
            problem = problem or "bad_label"
    key = sanitize_key(str(Path(listed.split("://")[-1]).with_suffix("")))
    return Item(key, source, caption, label, problem, cell)


def mark_duplicates(items: list[Item]) -> list[Item]:
    """The same source listed twice is a duplicate; different sources whose names sanitise to one key
    (`a b.jpg`, `a_b.jpg`) get distinct keys (a short hash of the source path appended)."""
    sources: dict[str, str] = {}
    out = []
    for item in items:
        if item.key in sources and item.problem is None:
            if sources[item.key] == item.source:
                item = Item(item.key, item.source, item.caption, item.label, "duplicate_key")
            else:
                suffix = hashlib.sha1(item.source.encode("utf-8", "surrogatepass")).hexdigest()[:8]
                item = Item(f"{item.key}-{suffix}", item.source, item.caption, item.label, item.problem)
        sources.setdefault(item.key, item.source)
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


def shard_fingerprint(job: ShardJob) -> str:
    """What a shard is made of: its inputs (key, path, size, caption, label, problem) and the options.
    A rerun reuses a finished shard only when this is unchanged."""
    described: list = [asdict(job.options)]
    for item in job.items:
        local = item.source and item.cell is None and "://" not in item.source and item.problem is None
        try:
            size = os.stat(item.source).st_size if local else None
        except OSError:
            size = None
        described.append([item.key, item.source, size, item.caption, item.label, item.problem, item.cell])
    text = json.dumps(described, ensure_ascii=True).encode("utf-8", "surrogatepass")
    return hashlib.sha256(text).hexdigest()


@dataclass(frozen=True)
class ShardJob:
    number: int
    items: list[Item]
    output: str
    storage: dict
    options: Options
    endpoint_url: str | None = None  # for inputs on S3


def read_input(item: Item, job: ShardJob, row_groups: dict) -> bytes:
    """The input's bytes: from a parquet row group (read once per shard), an object store, or a file."""
    limit = int(job.options.max_file_mb * 2**20) + 1
    if item.cell is not None:
        file, group, row, column = item.cell
        if (file, group) not in row_groups:
            import pyarrow.parquet as pq

            row_groups.clear()  # a shard's rows are consecutive: one row group (or two) at a time
            row_groups[(file, group)] = pq.ParquetFile(file).read_row_group(group, columns=[column])[column].to_pylist()
        value = row_groups[(file, group)][row]
        return (value.get("bytes") if isinstance(value, dict) else value) or b""
    if "://" in item.source:
        fs, path = filesystem(item.source, **storage_options(item.source, job.endpoint_url))
        with fs.open(path, "rb") as handle:
            return handle.read(limit)  # pyright: ignore[reportReturnType] (opened "rb")
    with open(item.source, "rb") as handle:
        return handle.read(limit)  # a file that grew since listing is caught by the caller


def write_shard(job: ShardJob) -> dict:
    """Write one shard (or reuse it if complete); returns its counts and ShardInfo fields."""
    fs, root = filesystem(job.output, **job.storage)
    name = shard_name(job.number)
    report_path = f"{root}/{name[: -len('.tar')]}.report.json"
    fingerprint = shard_fingerprint(job)
    if fs.exists(f"{root}/{index_name(name)}"):
        part = json.loads(with_retries(lambda: fs.cat_file(report_path), report_path))
        if part.get("fingerprint") == fingerprint:
            part["reused"] = True
            return part
        fs.rm(f"{root}/{index_name(name)}")  # other inputs or options than when it was written: redo it
    writer = ShardWriter(fs, root, name)
    skipped, converted = Counter(), Counter()
    row_groups: dict = {}
    for item in job.items:
        if item.problem:
            skipped[item.problem] += 1
            continue
        try:
            data = read_input(item, job, row_groups)
            if len(data) > job.options.max_file_mb * 2**20:
                raise Skip("too_large_file")
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
        "fingerprint": fingerprint,
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
    create_bucket: bool = False,
) -> Report:
    """Ingest `source` into shards under `output` (a directory or s3://bucket/prefix) plus a manifest.
    With part=(i, n), write only every n-th shard from the i-th and no manifest: one task of a job array,
    whose final step (a run without part) reuses every shard and writes the manifest and whole report."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pixelflow-ingest-") as scratch:  # gone however the ingest ends
        if str(source).startswith("s3://"):  # Path would fold the scheme's '//'
            storage = storage_options(str(source), endpoint_url)
            items, classes = list_remote_items(str(source), kind, options, storage, scratch)
        else:
            source = Path(source)
            kind = kind or detect_kind(source)
            if kind not in KINDS:
                raise IngestError(f"--kind {kind}: must be one of {', '.join(KINDS)}")
            items, classes = list_items(source, kind, options)
        items = mark_duplicates(items)
        storage = storage_options(output, endpoint_url)
        fs, root = filesystem(output, **storage)
        if output.startswith("s3://") and not create_bucket and not fs.exists(root.split("/")[0]):
            raise IngestError(
                f"{output}: bucket {root.split('/')[0]} does not exist; create it or pass --create-bucket"
            )
        fs.makedirs(root, exist_ok=True)
        shards = enumerate(plan_shards(items, options))
        jobs = [ShardJob(n, group, output, storage, options, endpoint_url) for n, group in shards]
        if part is not None:
            jobs = jobs[part[0] :: part[1]]
        report = Report(inputs=sum(len(job.items) for job in jobs))
        sizes = {job.number: len(job.items) for job in jobs}
        infos: dict[int, ShardInfo] = {}
        max_label = None
        context = multiprocessing.get_context("spawn")  # s3fs clients and their threads do not survive fork
        bar = Progress(report.inputs, "ingest", "img", enabled=progress)
        with bar, context.Pool(workers) if workers > 1 else _InProcess() as pool:
            for written in pool.imap_unordered(write_shard, jobs):
                report.add(written)
                report.shards_reused += written["reused"]
                if written["shard"]["count"]:
                    infos[written["number"]] = ShardInfo(**written["shard"])
                if written["max_label"] is not None:
                    max_label = max(written["max_label"], max_label if max_label is not None else -1)
                bar.update(sizes[written["number"]])
        report.shards = len(infos)
        report.seconds = round(time.perf_counter() - started, 3)
        if part is not None:
            return report
        if not report.written:  # an empty dataset is never a success
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items())) or "no inputs"
            raise IngestError(f"{source}: nothing written: {report.inputs} inputs, none usable ({reasons})")
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
