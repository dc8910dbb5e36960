"""The frozen text encoder (T5) of text-to-image models: beside the trained model, never inside it.

It is loaded with transformers from a local directory (a saved model or a hub cache snapshot holding the
encoder weights and its tokenizer); nothing is ever downloaded. It is outside the optimizer, the EMA and
checkpoints, runs without gradients (bf16 on CUDA, float32 on CPU), and can be FSDP-sharded over the data
ranks (`text.shard_encoder`) instead of replicated. Captions are padded to the longest in each call, not to
`max_tokens`: padded positions are masked in cross-attention and zeroed here, so they change nothing. The
trainer pads each step's captions further, to a length bucket (`bucket_length`), so that a compiled model
builds a few graphs instead of one per longest caption.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from pixelflow.errors import ConfigError


def pad_tokens(text: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) embeddings and (B, L) mask padded with masked zeros to `length` tokens."""
    extra = length - text.shape[1]
    return F.pad(text, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def bucket_length(length: int, max_tokens: int) -> int:
    """The padded length of captions whose longest has `length` tokens: the next power of two from 8 on,
    capped at max_tokens (at most log2(max_tokens) - 1 lengths, so as many compiled graphs per layout)."""
    bucket = max(8, 1 << max(length - 1, 0).bit_length())
    return max(length, min(bucket, max_tokens))


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_encoder_path(path: str | None) -> Path:
    """The encoder directory, or one clear error naming what is missing."""
    if not path:
        raise ConfigError(
            "text.encoder: not set; a text-conditioned model (model.text_dim) needs a local T5 encoder directory "
            "(e.g. a saved google/flan-t5-xl, or `pixelflow-data tiny-text-encoder` for tests and demos)"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"text.encoder: {folder}: no such directory (nothing is downloaded; give a local copy)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"text.encoder: {folder}: no config.json (not a saved transformers model)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
        raise ConfigError(f"text.encoder: {folder}: no tokenizer files (tokenizer.json or spiece.model)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(
            f"text.encoder: {folder}: no weights (model.safetensors or pytorch_model.bin, or their index)"
        )
    return folder


class TextEncoder:
    def __init__(self, path: str | None, max_tokens: int, device: torch.device):
        from transformers import AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        folder = check_encoder_path(path)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.device, self.max_tokens = device, max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        self.model = model.to(device).eval().requires_grad_(False)  # pyright: ignore[reportArgumentType] (transformers' stubs type .to as T5's own)
        self.dim = int(model.config.d_model)
        self.folder = folder
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None

    def identity(self) -> dict:
        """What its embeddings depend on: the folder, its config's checksum, its weight files' sizes, the width
        and the token limit (so embeddings of another encoder are never taken for this one's)."""
        config = zlib.crc32((self.folder / "config.json").read_bytes())
        weights = {name: (self.folder / name).stat().st_size for name in WEIGHT_FILES if (self.folder / name).is_file()}
        return {
            "encoder": str(self.folder.resolve()),
            "config_crc32": config,
            "weights": weights,
            "dim": self.dim,
            "max_tokens": self.max_tokens,
        }

    def shard(self, mesh) -> None:
        """FSDP2-shard the encoder's blocks over `mesh` (every rank must then encode in step)."""
        from torch.distributed.fsdp import fully_shard

        for block in self.model.encoder.block:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(self.model, mesh=mesh, reshard_after_forward=True)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) float32 token embeddings, zero at padding, and the (B, L) mask (1 = token), L the longest
        caption in tokens (at most max_tokens, with T5's end token)."""
        tokens = self.tokenizer(
            list(captions) or [""], padding="longest", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        hidden = hidden * mask[..., None]
        return hidden[: len(captions)], mask[: len(captions)]

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's (1, L, D) embedding and mask, computed once (caption dropout, guidance)."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty
