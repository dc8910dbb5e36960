"""Caption embeddings for the trainer: from the step's captions (text.mode=online, the frozen T5 on the
training ranks) or from embeddings stored by `pixelflow-data encode-text` (precomputed). Either way a
unit's samples get (n, L, D) float32 embeddings with a mask, and each micro-batch takes its rows in stream
order and replaces the dropped captions (caption dropout, decided by the sample's own draw like label
dropout) with the empty caption's embedding.
"""

from __future__ import annotations

import numpy as np
import torch

from pixelflow.config import Config
from pixelflow.data.storage import filesystem, storage_options
from pixelflow.data.text_store import embeddings_location, read_info
from pixelflow.devices import to_device
from pixelflow.errors import ConfigError
from pixelflow.model.text_encoder import bucket_length, check_encoder_path, pad_tokens
from pixelflow.parallel.world import World


class UnitText:
    """The text side of one unit's samples for one step, padded once to one bucketed length (see
    bucket_length: a compiled model sees few caption lengths) with the empty caption, so that a
    micro-batch's text is two gathers and a select: no host sync in the step."""

    def __init__(
        self,
        embeddings: torch.Tensor,
        mask: torch.Tensor,
        empty: torch.Tensor,
        empty_mask: torch.Tensor,
        dropout: float,
        *,
        max_tokens: int,
    ):
        length = bucket_length(max(embeddings.shape[1], empty.shape[1]), max_tokens)
        self.embeddings, self.mask = pad_tokens(embeddings, mask, length)  # (n, L, D) zero at padding, (n, L)
        self.empty, self.empty_mask = pad_tokens(empty, empty_mask, length)  # (1, L, D), (1, L)
        self.dropout = dropout

    def micro_batch(self, rows: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, mask) for a micro-batch: `rows` of the unit's samples in stream order, their dropout draws."""
        text, mask = self.embeddings.index_select(0, rows), self.mask.index_select(0, rows)
        dropped = draws < self.dropout
        text = torch.where(dropped[:, None, None], self.empty.expand_as(text), text)
        return text, torch.where(dropped[:, None], self.empty_mask.expand_as(mask), mask)

    def padding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The text of a padding micro-batch's one sample."""
        return self.empty, self.empty_mask


def read_embeddings_info(cfg: Config) -> np.ndarray:
    """The empty caption's (L, D) embedding of the precomputed embeddings (a mixture's first source's), each
    source's checked against model.text_dim and against the first source's encoder."""
    first = None
    for source in cfg.data.datasets():
        location = embeddings_location(source.embeddings or cfg.text.embeddings, source.path)
        fs, base = filesystem(location, **storage_options(location, cfg.data.endpoint_url))
        info, empty = read_info(fs, base)
        if int(info["dim"]) != cfg.model.text_dim:
            raise ConfigError(
                f"model.text_dim = {cfg.model.text_dim} but the embeddings in {location} ({info['encoder']}) are "
                f"{info['dim']}-wide tokens"
            )
        if first is not None and info["encoder"] != first[1]:
            raise ConfigError(
                f"{location}: embeddings of {info['encoder']}, but {first[0]} holds {first[1]}'s: the sources of a "
                f"mixture need one encoder's embeddings"
            )
        first = first or (location, info["encoder"], empty)
    assert first is not None  # a run reads at least one source
    return first[2]


def check_text_source(cfg: Config) -> None:
    """What TextConditioner needs, checked without loading an encoder: its folder, or the embeddings' info."""
    if cfg.text.mode == "online":
        check_encoder_path(cfg.text.encoder)
    else:
        read_embeddings_info(cfg)


class TextConditioner:
    def __init__(self, cfg: Config, world: World):
        self.device, self.dropout, self.encoder = world.device, cfg.text.dropout, None
        self.max_tokens = cfg.text.max_tokens
        if cfg.text.mode == "online":
            from pixelflow.model.text_encoder import TextEncoder

            self.encoder = TextEncoder(cfg.text.encoder, cfg.text.max_tokens, world.device)
            if cfg.text.shard_encoder and world.distributed:
                self.encoder.shard(world.fsdp_mesh)
            self.empty, self.empty_mask = self.encoder.empty()
            self.dim = self.encoder.dim
            if self.dim != cfg.model.text_dim:
                raise ConfigError(
                    f"model.text_dim = {cfg.model.text_dim} but text.encoder {cfg.text.encoder} gives "
                    f"{self.dim}-wide tokens"
                )
        else:
            empty = read_embeddings_info(cfg)
            self.empty = torch.from_numpy(empty.astype(np.float32))[None].to(world.device)
            self.empty_mask = torch.ones(self.empty.shape[:2], dtype=torch.int64, device=world.device)
            self.dim = cfg.model.text_dim or 0

    def unit(self, payloads: list[bytes]) -> UnitText:
        """The text of a unit's samples from what travelled with them (every rank calls this once a step:
        a sharded encoder needs them in step)."""
        if self.encoder is not None:
            embeddings, mask = self.encoder.encode([p.decode("utf-8", "replace") for p in payloads])
        else:
            arrays = [np.frombuffer(p, dtype=np.float16).reshape(-1, self.dim) for p in payloads]
            longest = max((len(a) for a in arrays), default=1)
            embeddings = torch.zeros((len(arrays), longest, self.dim))
            mask = torch.zeros((len(arrays), longest), dtype=torch.int64)
            for row, array in enumerate(arrays):
                embeddings[row, : len(array)] = torch.from_numpy(array.astype(np.float32))
                mask[row, : len(array)] = 1
            embeddings, mask = to_device(embeddings, self.device), to_device(mask, self.device)  # pinned
        return UnitText(embeddings, mask, self.empty, self.empty_mask, self.dropout, max_tokens=self.max_tokens)
