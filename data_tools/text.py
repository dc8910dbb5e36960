"""Text side of a dataset: a tiny stand-in T5 encoder for demos and tests, and precomputed caption embeddings.

`tiny_text_encoder` writes a randomly initialised T5 encoder and a word-level tokenizer trained on the
dataset's captions (the tokenizers library), saved as transformers saves models: `text.encoder` takes the
folder exactly as it would take a real Flan-T5-XL. `encode_text` runs the frozen encoder over every shard's
captions and stores the unpadded embeddings beside the shards (`pixelflow.data.text_store`); a rerun skips
shards already encoded from the same shard contents, and `part=(i, n)` encodes every n-th shard (SLURM
arrays).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from pixelflow.data import text_store
from pixelflow.data.loader import caption_bytes
from pixelflow.data.shard_format import Manifest, parse_sample, read_index, read_manifest
from pixelflow.data.storage import filesystem
from pixelflow.progress import Progress


def shard_captions(fs, base: str, name: str, manifest: Manifest, storage_options: dict) -> list[tuple[str, str]]:
    """(key, caption) of a shard's samples in order (adopted tars: read where the manifest says)."""
    entries = read_index(fs, base, name)
    tar_fs, tar_base = filesystem(manifest.location, **storage_options) if manifest.location else (fs, base)
    data: bytes = tar_fs.cat_file(f"{tar_base}/{name}")  # pyright: ignore[reportAssignmentType] (bytes)
    out = []
    for entry in entries:
        members = parse_sample(data[entry.offset : entry.offset + entry.length], f"{tar_base}/{name} {entry.key}")
        out.append((entry.key, caption_bytes(members, manifest.caption_field).decode("utf-8", "replace")))
    return out


def tiny_text_encoder(
    dataset: str, output: str, dim: int = 32, layers: int = 2, storage_options: dict | None = None
) -> str:
    """Write a random-weight T5 encoder (d_model `dim`) with a word-level tokenizer over the dataset's captions."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    fs, base = filesystem(dataset, **(storage_options or {}))
    manifest = read_manifest(fs, base)
    captions = [
        caption
        for shard in manifest.shards
        for _, caption in shard_captions(fs, base, shard.name, manifest, storage_options or {})
    ]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=tokenizer.get_vocab_size(),
        d_model=dim,
        d_kv=dim // 2,
        d_ff=2 * dim,
        num_layers=layers,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    T5EncoderModel(config).save_pretrained(output)
    wrapped.save_pretrained(output)
    return output


@dataclass
class EncodeReport:
    shards: int
    encoded: int
    skipped: int


def encode_text(
    dataset: str,
    encoder: str,
    output: str | None = None,
    max_tokens: int = 512,
    batch: int = 64,
    device: str = "cpu",
    part: tuple[int, int] | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> EncodeReport:
    """Encode every shard's captions (or part i of n of the shards) into `output` (default beside the shards)."""
    from pixelflow.model.text_encoder import TextEncoder

    fs, base = filesystem(dataset, **(storage_options or {}))
    out_fs, out_base = filesystem(text_store.embeddings_location(output, dataset), **(storage_options or {}))
    out_fs.makedirs(out_base, exist_ok=True)
    manifest = read_manifest(fs, base)
    model = TextEncoder(encoder, max_tokens, torch.device(device))
    empty, _ = model.empty()
    if part is None or part[0] == 0:
        text_store.write_info(out_fs, out_base, encoder, max_tokens, empty[0].cpu().numpy())
    chosen = [shard for i, shard in enumerate(manifest.shards) if part is None or i % part[1] == part[0]]
    encoded = 0
    with Progress(len(chosen), "encoding captions", "shard", enabled=progress) as bar:
        for shard in chosen:
            captions = functools.partial(shard_captions, fs, base, shard.name, manifest, storage_options or {})
            encoded += encode_shard(model, captions, out_fs, out_base, shard, batch)
            bar.update()
    return EncodeReport(len(chosen), encoded, len(chosen) - encoded)


def encode_shard(model, read_captions, out_fs, out_base: str, shard, batch: int) -> bool:
    """Encode one shard's captions (read_captions(): its (key, caption)s); False when they were already
    encoded from the same shard."""
    name = shard.name.removesuffix(".tar")
    source = json.dumps([shard.name, shard.count, shard.bytes, model.identity()])  # the shard's and the encoder's
    done = text_store.read_index(out_fs, out_base, name)
    if done is not None and done.get("source") == source:
        return False
    captions = read_captions()
    items = []
    for first in range(0, len(captions), batch):
        chunk = captions[first : first + batch]
        embeddings, mask = model.encode([caption for _, caption in chunk])
        for (key, _), row, keep in zip(chunk, embeddings, mask):
            items.append((key, row[: int(keep.sum())].cpu().numpy()))
    text_store.write_shard(out_fs, out_base, name, items, source)
    return True
