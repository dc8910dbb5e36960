"""The one shard format, shared by the writer (data_tools) and the reader (pixelflow.data).

A dataset is a directory (local or s3://bucket/prefix) holding:
- `shard-NNNNNN.tar`: webdataset tars, one sample = `{key}.{jpg|png|webp}`, `{key}.txt` (caption) and
  `{key}.json` (metadata: label, width, height, source), written back to back;
- `shard-NNNNNN.index.json`: per-shard index with each sample's key, byte offset and length in the tar,
  image size and label. A shard is complete only once its index exists (written after the tar);
- `manifest.json`: the shard list with counts and the format version. Readers start from it and never list
  the bucket.

A dataset can also *adopt* webdataset tars written elsewhere (`pixelflow-data index`: img2dataset output,
`webdataset.ShardWriter` tars) without copying them: the indexes and the manifest are written beside the
tars or in another place, and the manifest's `location` says where the tars are. Keys then follow
webdataset's rule (the member path up to the first dot of its file name, folders included), and a caption
may come from a field of the sample's `.json` (`caption_field`).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import asdict, dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem
from webdataset.tariterators import tar_file_iterator

from pixelflow.data.storage import with_retries
from pixelflow.errors import ShardFormatError

FORMAT_NAME = "pixelflow-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-]*$")
_SHARD_PATTERN = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*\.tar$")


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".index.json"


def member_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member, by webdataset's rule: the path up to the first dot of the
    file name, folders included (`train/000001.seg.png` -> (`train/000001`, `seg.png`))."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def readable_key(key: object) -> bool:
    """A key an index may hold: ours (letters, digits, '_', '-'), or an adopted tar's member path, which is
    only ever compared, never opened (no absolute path, no '..', no NUL)."""
    if not isinstance(key, str) or not key or "\x00" in key or key.startswith("/"):
        return False
    return ".." not in key.split("/")


def check_key(key: str) -> str:
    """Sample keys become tar member names: letters, digits, '_' and '-' only, so no member can escape."""
    if not _KEY_PATTERN.match(key):
        raise ShardFormatError(f"sample key {key!r} may only hold letters, digits, '_' and '-'")
    return key


@dataclass(frozen=True)
class SampleEntry:
    key: str
    offset: int  # byte offset of the sample's first tar header in the shard
    length: int  # bytes spanned by all the sample's members
    image: str  # image member extension
    width: int
    height: int
    label: int | None = None


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int


@dataclass
class Manifest:
    shards: list[ShardInfo]
    num_classes: int | None = None
    extra: dict = field(default_factory=dict)
    location: str | None = None  # where the tars are (adopted tars); None = beside the manifest
    caption_field: str | None = None  # captions from this field of each sample's .json instead of its .txt

    @property
    def num_samples(self) -> int:
        return sum(shard.count for shard in self.shards)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "num_samples": self.num_samples,
                "num_classes": self.num_classes,
                "shards": [asdict(s) for s in self.shards],
                **({"location": self.location} if self.location else {}),
                **({"caption_field": self.caption_field} if self.caption_field else {}),
                **self.extra,
            },
            indent=1,
        )

    @staticmethod
    def from_json(text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ShardFormatError(f"{where}: not a {FORMAT_NAME} manifest (a JSON {type(raw).__name__})")
            if raw.get("format") != FORMAT_NAME:
                raise ShardFormatError(f"{where}: not a {FORMAT_NAME} manifest")
            if raw.get("version") != FORMAT_VERSION:
                raise ShardFormatError(
                    f"{where}: format version {raw.get('version')}, this reader knows {FORMAT_VERSION}"
                )
            shards = [ShardInfo(str(s["name"]), int(s["count"]), int(s["bytes"])) for s in raw["shards"]]
            for shard in shards:  # plain names in the dataset folder: a manifest cannot point elsewhere
                if not _SHARD_PATTERN.match(shard.name) or shard.count < 0 or shard.bytes < 0:
                    raise ShardFormatError(f"{where}: shard entry {shard.name!r} is not a shard of this dataset")
            location, caption_field = raw.get("location"), raw.get("caption_field")
            if location is not None and (not isinstance(location, str) or not location):
                raise ShardFormatError(f"{where}: location = {location!r} is not a folder of tars")
            if caption_field is not None and (not isinstance(caption_field, str) or not caption_field):
                raise ShardFormatError(f"{where}: caption_field = {caption_field!r} is not a field name")
            num_classes = raw.get("num_classes")
            if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
                raise ShardFormatError(f"{where}: num_classes = {num_classes!r} is not a class count")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ShardFormatError):
                raise
            raise ShardFormatError(f"{where}: malformed manifest ({exc})") from None
        return Manifest(shards, raw.get("num_classes"), location=location, caption_field=caption_field)


def read_manifest(fs: fsspec.AbstractFileSystem, root: str, retries: int = 5, retry_wait: float = 0.5) -> Manifest:
    where = f"{root}/{MANIFEST_NAME}"
    try:
        text = with_retries(lambda: fs.cat_file(where), where, retries, retry_wait).decode()  # pyright: ignore[reportAttributeAccessIssue] (cat_file returns bytes)
    except (FileNotFoundError, NotADirectoryError):
        if fs.isfile(root):
            raise ShardFormatError(
                f"{root}: a file, not a dataset: give the folder that holds manifest.json and the shards"
            ) from None
        raise ShardFormatError(f"{where}: no manifest; is this a dataset written by pixelflow-data?") from None
    return Manifest.from_json(text, where)


def write_json_atomically(fs: fsspec.AbstractFileSystem, path: str, text: str) -> None:
    """Write text so that readers see either nothing or the whole file (rename on local disk; S3 PUT is atomic)."""
    if isinstance(fs, LocalFileSystem):
        temporary = path + ".partial"
        fs.pipe_file(temporary, text.encode())
        fs.mv(temporary, path)
    else:
        fs.pipe_file(path, text.encode())


def read_index(
    fs: fsspec.AbstractFileSystem, root: str, shard: str, retries: int = 5, retry_wait: float = 0.5
) -> list[SampleEntry]:
    where = f"{root}/{index_name(shard)}"
    try:
        raw = json.loads(with_retries(lambda: fs.cat_file(where), where, retries, retry_wait))
        entries = [SampleEntry(**entry) for entry in raw["samples"]]
    except FileNotFoundError:
        raise ShardFormatError(f"{where}: index missing; the shard was never completed") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShardFormatError(f"{where}: malformed index ({exc})") from None
    check_entries(entries, raw.get("bytes"), where)
    return entries


def check_entries(entries: list[SampleEntry], shard_bytes, where: str) -> None:
    """Every entry a distinct, in-bounds byte range of the shard, in file order, with a valid key."""
    end = 0
    for entry in entries:
        fields_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (entry.offset, entry.length))
        if not fields_ok or not readable_key(entry.key):
            raise ShardFormatError(f"{where}: entry {entry.key!r} is malformed")
        if entry.offset < 0:
            raise ShardFormatError(f"{where}: entry {entry.key!r} has a negative offset")
        if entry.offset < end or entry.length <= 0:
            raise ShardFormatError(f"{where}: entry {entry.key!r} overlaps the one before it or is empty")
        end = entry.offset + entry.length
        if isinstance(shard_bytes, int) and end > shard_bytes:
            raise ShardFormatError(f"{where}: entry {entry.key!r} runs past the shard's end ({end} > {shard_bytes})")
        if entry.label is not None and (not isinstance(entry.label, int) or entry.label < 0):
            raise ShardFormatError(f"{where}: entry {entry.key!r} has label {entry.label!r}")


def index_json(shard: str, entries: list[SampleEntry], total_bytes: int) -> str:
    return json.dumps(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "shard": shard,
            "bytes": total_bytes,
            "samples": [asdict(e) for e in entries],
        }
    )


def parse_sample(raw: bytes, where: str) -> dict[str, bytes]:
    """Members of one sample's tar bytes as {extension: data}; the key is checked against the index."""
    members = {}
    try:
        for member in tar_file_iterator(io.BytesIO(raw)):  # pyright: ignore[reportArgumentType] (webdataset reads any file object)
            key, extension = member_key(member["fname"])
            members[extension] = member["data"]
            members.setdefault("__key__", key.encode())
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise ShardFormatError(f"{where}: unreadable tar bytes ({exc})") from None
    return members


class ShardWriter:
    """Appends samples to one tar on any fsspec filesystem and records the index as it goes.

    Members get fixed metadata (mtime 0, uid 0, mode 0644) so the same input gives byte-identical shards.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, name: str):
        self.fs, self.root, self.name = fs, root, name
        self._file = fs.open(f"{root}/{name}", "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # pyright: ignore[reportCallIssue, reportArgumentType] (a binary fsspec file)
        self.entries: list[SampleEntry] = []

    def _add_member(self, member: str, data: bytes) -> None:
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, image: bytes, image_ext: str, caption: str, meta: dict) -> None:
        check_key(key)
        if image_ext not in IMAGE_EXTENSIONS:
            raise ShardFormatError(f"sample {key}: image extension {image_ext!r} is not one of {IMAGE_EXTENSIONS}")
        offset = self._tar.offset
        self._add_member(f"{key}.{image_ext}", image)
        self._add_member(f"{key}.txt", caption.encode())
        self._add_member(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.entries.append(
            SampleEntry(
                key,
                offset,
                self._tar.offset - offset,
                image_ext,
                int(meta["width"]),
                int(meta["height"]),
                meta.get("label"),
            )
        )

    @property
    def bytes_written(self) -> int:
        return self._tar.offset

    def close_tar(self) -> ShardInfo:
        """Finish and upload the tar; the shard is not complete until `commit`."""
        self._tar.close()
        self._file.close()
        self.info = ShardInfo(self.name, len(self.entries), self.fs.size(f"{self.root}/{self.name}"))  # pyright: ignore[reportArgumentType] (a written file has a size)
        return self.info

    def commit(self) -> None:
        """Write the index, the shard's commit marker (always after its tar)."""
        index = index_json(self.name, self.entries, self.info.bytes)
        write_json_atomically(self.fs, f"{self.root}/{index_name(self.name)}", index)

    def close(self) -> ShardInfo:
        info = self.close_tar()
        self.commit()
        return info
