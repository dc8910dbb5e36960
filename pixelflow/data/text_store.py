"""Precomputed caption embeddings beside the shards (`pixelflow-data encode-text` writes, the loader reads).

Under the embeddings folder (default `<dataset>/text-embeddings`), per image shard `shard-NNNNNN`:
- `shard-NNNNNN.f16`: every sample's (L_i, D) float16 token embeddings back to back, unpadded (no 512-token
  padding is stored);
- `shard-NNNNNN.f16.json`: `{"dim": D, "source": <shard fingerprint>, "entries": [[key, offset, tokens]...]}`
  in the shard's sample order, written last: the shard's commit marker.
And once: `encoder.json` (encoder path, max_tokens, dim) with `empty.f16`, the empty caption's embedding.
A block of samples is read with one ranged read per shard, like the images.
"""

from __future__ import annotations

import json

import numpy as np

from pixelflow.data.shard_format import write_json_atomically
from pixelflow.data.storage import with_retries
from pixelflow.errors import ShardFormatError

SUFFIX = ".f16"


def embeddings_location(embeddings: str | None, data_path: str) -> str:
    """Where a dataset's embeddings live: `text.embeddings`, else beside the shards."""
    return embeddings or f"{data_path.rstrip('/')}/text-embeddings"


def write_shard(fs, base: str, shard: str, items: list[tuple[str, np.ndarray]], source: str) -> None:
    """Write one shard's embeddings ((L, D) arrays, any float dtype) and then its index."""
    dim = int(items[0][1].shape[1]) if items else 0
    entries, offset, chunks = [], 0, []
    for key, array in items:
        data = np.ascontiguousarray(array, dtype=np.float16).tobytes()
        entries.append([key, offset, int(array.shape[0])])
        chunks.append(data)
        offset += len(data)
    with fs.open(f"{base}/{shard}{SUFFIX}", "wb") as out:
        out.write(b"".join(chunks))
    index = {"dim": dim, "source": source, "entries": entries}
    write_json_atomically(fs, f"{base}/{shard}{SUFFIX}.json", json.dumps(index))


def read_index(fs, base: str, shard: str, retries: int = 5, retry_wait: float = 0.5) -> dict | None:
    """A shard's embeddings index, or None when the shard has not been encoded (yet)."""
    path = f"{base}/{shard}{SUFFIX}.json"
    try:
        text = with_retries(lambda: fs.cat_file(path), f"reading {path}", retries, retry_wait)
    except FileNotFoundError:
        return None
    return json.loads(text)


def read_entries(
    fs, base: str, shard: str, index: dict, first: int, stop: int, retries: int = 5, retry_wait: float = 0.5
) -> list[np.ndarray]:
    """Embeddings of the shard's samples [first, stop) in one ranged read, as (L, D) float16 arrays."""
    dim, entries = index["dim"], index["entries"][first:stop]
    start = entries[0][1]
    end = entries[-1][1] + entries[-1][2] * dim * 2
    path = f"{base}/{shard}{SUFFIX}"
    raw = with_retries(lambda: fs.cat_file(path, start=start, end=end), f"reading {path}", retries, retry_wait)
    if len(raw) != end - start:
        raise ShardFormatError(f"{path}: shorter than its index says (truncated?)")
    out = []
    for _, offset, tokens in entries:
        chunk = raw[offset - start : offset - start + tokens * dim * 2]
        out.append(np.frombuffer(chunk, dtype=np.float16).reshape(tokens, dim))
    return out


def write_info(fs, base: str, encoder: str, max_tokens: int, empty: np.ndarray) -> None:
    with fs.open(f"{base}/empty{SUFFIX}", "wb") as out:
        out.write(np.ascontiguousarray(empty, dtype=np.float16).tobytes())
    info = {"encoder": encoder, "max_tokens": max_tokens, "dim": int(empty.shape[1]), "empty_tokens": len(empty)}
    write_json_atomically(fs, f"{base}/encoder.json", json.dumps(info))


def read_info(fs, base: str) -> tuple[dict, np.ndarray]:
    """(encoder.json, the empty caption's (L, D) embedding); one clear error when encode-text never ran."""
    try:
        info = json.loads(fs.cat_file(f"{base}/encoder.json"))
        empty = np.frombuffer(fs.cat_file(f"{base}/empty{SUFFIX}"), dtype=np.float16)
    except FileNotFoundError:
        raise ShardFormatError(
            f"{base}: no precomputed caption embeddings (run `pixelflow-data encode-text` for text.mode=precomputed)"
        ) from None
    return info, empty.reshape(info["empty_tokens"], info["dim"])
