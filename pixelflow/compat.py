"""Compatibility with the public reference implementation (github.com/ShoufaChen/PixelFlow).

- `convert_official(src, dst)`: the reference's `model.pt` + `config.yaml` (what its sample_ddp.py loads)
  -> an export of ours (model.safetensors + config.yaml). Every key is accounted for before anything is written.
- `OfficialAdapter`: our model behind the reference `PixelFlowModel.forward` signature (eval mode), so code
  written against the reference runs unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pixelflow.config import CascadeConfig, Config, DataConfig, ModelConfig, TrainConfig
from pixelflow.errors import ConversionError
from pixelflow.generate import load_for_sampling
from pixelflow.model import PixelFlowTransformer
from pixelflow.model.embeddings import rope_table
from pixelflow.weights import write_export

# reference key (regex) -> our key (template); block index captured as \1
_KEY_RULES = [
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"timestep_embedder\.(linear_[12]\.(?:weight|bias))", r"time_embed.\1"),
    (r"latent_size_embedder\.(linear_[12]\.(?:weight|bias))", r"size_embed.\1"),
    (r"class_embedder\.embedding_table\.weight", r"class_embed.weight"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)", r"blocks.\1.modulation.\2"),
    (r"transformer_blocks\.(\d+)\.attn1\.(.+)", r"blocks.\1.attn.\2"),
    (r"transformer_blocks\.(\d+)\.norm2\.weight", r"blocks.\1.cross_norm.weight"),
    (r"transformer_blocks\.(\d+)\.attn2\.(.+)", r"blocks.\1.cross_attn.\2"),
    (r"transformer_blocks\.(\d+)\.norm3\.weight", r"blocks.\1.mlp_norm.weight"),
    (r"transformer_blocks\.(\d+)\.mlp\.(.+)", r"blocks.\1.mlp.\2"),
    (r"proj_out_1\.(weight|bias)", r"final.modulation.\1"),
    (r"proj_out_2\.(weight|bias)", r"final.proj.\1"),
]


def our_key(reference_key: str) -> str | None:
    for pattern, template in _KEY_RULES:
        match = re.fullmatch(pattern, reference_key)
        if match:
            return match.expand(template)
    return None


def config_from_reference(reference: dict, source: str) -> Config:
    """Our Config for a reference config.yaml (model.params, scheduler, data)."""
    try:
        params = reference["model"]["params"]
        in_channels = int(params.get("in_channels", 3))
        if int(params.get("out_channels", in_channels)) != in_channels:
            raise ConversionError(f"{source}: out_channels != in_channels is not supported")
        model = ModelConfig(
            depth=int(params["depth"]),
            num_heads=int(params["num_attention_heads"]),
            head_dim=int(params["attention_head_dim"]),
            patch_size=int(params["patch_size"]),
            in_channels=in_channels,
            num_classes=int(params.get("num_classes", 0)),
            attention_bias=bool(params.get("attention_bias", True)),
            text_dim=params.get("cross_attention_dim"),
        )
        scheduler = reference.get("scheduler", {})
        cascade = CascadeConfig(
            stages=int(scheduler.get("num_stages", 4)),
            num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
        )
        resolution = int(reference.get("data", {}).get("resolution", 256))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConversionError):
            raise
        raise ConversionError(f"{source}: not a reference PixelFlow config ({exc!r} missing or malformed)") from None
    return Config(
        run_dir="",
        model=model,
        cascade=cascade,
        data=DataConfig(path="", resolution=resolution),
        train=TrainConfig(steps=1),
    )


def _reorder_output_rows(tensor: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Reference output rows are ordered (py, px, c); ours (c, py, px)."""
    rest = tensor.shape[1:]
    return tensor.reshape(patch_size, patch_size, channels, *rest).permute(2, 0, 1, *range(3, 3 + len(rest)))


def convert_state_dict(reference: dict[str, torch.Tensor], cfg: Config, source: str) -> dict[str, torch.Tensor]:
    """Map a reference state dict onto our model's keys; unknown, missing or misshapen keys raise one error."""
    with torch.device("meta"):
        expected = PixelFlowTransformer(cfg.model).state_dict()
    converted, unknown = {}, []
    p, c = cfg.model.patch_size, cfg.model.in_channels
    for key, tensor in reference.items():
        target = our_key(key)
        if target is None or target not in expected:
            unknown.append(key)
            continue
        if target == "patch_embed.weight":
            tensor = tensor.reshape(tensor.shape[0], -1)
        elif target.startswith("final.proj."):
            tensor = _reorder_output_rows(tensor, p, c).reshape(tensor.shape)
        converted[target] = tensor
    missing = sorted(set(expected) - set(converted))
    misshapen = [
        f"{k}: {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
        for k in converted
        if converted[k].shape != expected[k].shape
    ]
    problems = []
    for name, items in (("unknown keys", unknown), ("missing keys", missing), ("shape mismatches", misshapen)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{name}: {shown}")
    if problems:
        raise ConversionError(f"{source}: cannot convert; " + "; ".join(problems))
    return {k: v.float().contiguous() for k, v in converted.items()}


def convert_official(source: str | Path, destination: str | Path, force: bool = False) -> Path:
    """Convert a reference checkpoint directory (model.pt + config.yaml) or model.pt file into an export
    (model.safetensors + config.yaml) in destination. Nothing is written unless everything converts."""
    source = Path(source)
    weights = source / "model.pt" if source.is_dir() else source
    config_file = weights.parent / "config.yaml"
    if not weights.is_file():
        raise ConversionError(f"{weights}: reference weights not found")
    if not config_file.is_file():
        raise ConversionError(f"{config_file}: reference config not found (expected beside model.pt)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(f"{weights}: cannot be loaded safely ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("ema"), dict):
        state = state["ema"]  # a training checkpoint of the reference: its EMA weights are the ones to keep
    reference = OmegaConf.to_container(OmegaConf.load(config_file))
    if not isinstance(reference, dict):
        raise ConversionError(f"{config_file}: not a mapping of keys")
    cfg = config_from_reference(reference, str(config_file))
    destination = Path(destination)
    cfg.run_dir = str(destination)
    model_state = convert_state_dict(state, cfg, str(weights))
    return write_export(destination, model_state, cfg, str(weights), force)


@dataclass
class OfficialAdapter:
    """Calls our model with the keyword arguments of the reference `PixelFlowModel.forward` (eval mode)."""

    model: PixelFlowTransformer

    @staticmethod
    def from_checkpoint(path: str | Path, weights: str = "ema", device: str = "cpu") -> OfficialAdapter:
        return OfficialAdapter(load_for_sampling(path, weights, device)[0])

    @torch.no_grad()
    def __call__(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        latent_size: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        pos_embed: torch.Tensor | None = None,
        cu_seqlens_q: torch.Tensor | None = None,
        cu_seqlens_k: torch.Tensor | None = None,
        seqlen_list_q: list[int] | None = None,
        seqlen_list_k: list[int] | None = None,
    ) -> torch.Tensor:
        if cu_seqlens_q is not None or seqlen_list_q is not None:
            raise ValueError("OfficialAdapter serves the reference's eval (unpacked) call; train with our trainer")
        images = hidden_states.float()
        count, side = images.shape[0], images.shape[-1] // self.model.cfg.patch_size
        if latent_size is not None and bool((latent_size.float() != side).any()):
            raise ValueError(f"latent_size {latent_size.tolist()} differs from the token-grid side {side}")
        if pos_embed is not None:
            expected = rope_table((side, side), self.model.cfg.head_dim, pos_embed.device)
            if pos_embed.shape != expected.shape or not torch.allclose(pos_embed.float(), expected, atol=1e-5):
                raise ValueError("pos_embed is not the standard 2D RoPE grid the reference pipeline builds")
        if timestep is None:
            raise ValueError("the reference pipeline always passes a timestep")
        timesteps = timestep.float().reshape(-1).expand(count)
        return self.model.forward_images(images, timesteps, class_labels, encoder_hidden_states, encoder_attention_mask)
