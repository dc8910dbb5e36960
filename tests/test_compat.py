"""Reference compatibility: conversion of reference checkpoints and the reference-signature adapter."""

from __future__ import annotations

import pytest
import torch
import yaml
from PIL import Image

from pixelflow.compat import OfficialAdapter, convert_official
from pixelflow.errors import ConversionError
from pixelflow.model.embeddings import rope_table
from tests.conftest import cli
from tests.reference_pixelflow import reference_forward, reference_pos_embed, reference_state_dict

DEPTH, HEADS, HEAD_DIM, PATCH = 2, 2, 8, 4


def write_reference(directory, text_dim=None, classes=10, state=None):
    directory.mkdir(parents=True, exist_ok=True)
    state = state or reference_state_dict(DEPTH, HEADS, HEAD_DIM, PATCH, classes, text_dim)
    torch.save(state, directory / "model.pt")
    params = {
        "num_attention_heads": HEADS,
        "attention_head_dim": HEAD_DIM,
        "in_channels": 3,
        "out_channels": 3,
        "depth": DEPTH,
        "num_classes": classes,
        "patch_size": PATCH,
        "attention_bias": True,
    }
    if text_dim:
        params["cross_attention_dim"] = text_dim
    config = {
        "model": {"target": "pixelflow.model.PixelFlowModel", "params": params},
        "scheduler": {"num_train_timesteps": 1000, "num_stages": 4},
        "data": {"resolution": 32},
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return state


def test_reference_rope_grid_is_ours():
    for side in (1, 3, 8):
        assert torch.allclose(reference_pos_embed(side, 72), rope_table((side, side), 72), atol=1e-6)


@pytest.mark.parametrize("side", [1, 2, 4, 8])  # token-grid sides of the four stages of a 32-pixel model
def test_class_conditional_adapter_equals_reference(tmp_path, side):
    state = write_reference(tmp_path / "ref")
    convert_official(tmp_path / "ref", tmp_path / "ours")
    adapter = OfficialAdapter.from_checkpoint(tmp_path / "ours")
    torch.manual_seed(side)
    x = torch.randn(3, 3, side * PATCH, side * PATCH)
    t = torch.rand(3) * 999
    labels = torch.tensor([0, 7, 10])  # 10 = the null class
    kwargs = dict(
        hidden_states=x,
        timestep=t,
        class_labels=labels,
        latent_size=torch.tensor([side]),
        pos_embed=reference_pos_embed(side, HEAD_DIM),
    )
    expected = reference_forward(state, DEPTH, HEADS, PATCH, **kwargs)
    assert (adapter(**kwargs) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("side", [1, 4, 8])
def test_text_conditional_adapter_equals_reference(tmp_path, side):
    state = write_reference(tmp_path / "ref", text_dim=12, classes=0)
    convert_official(tmp_path / "ref", tmp_path / "ours")
    adapter = OfficialAdapter.from_checkpoint(tmp_path / "ours")
    torch.manual_seed(side)
    kwargs = dict(
        hidden_states=torch.randn(2, 3, side * PATCH, side * PATCH),
        timestep=torch.rand(2) * 999,
        latent_size=torch.tensor([side]),
        pos_embed=reference_pos_embed(side, HEAD_DIM),
        encoder_hidden_states=torch.randn(2, 5, 12),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    )
    expected = reference_forward(state, DEPTH, HEADS, PATCH, class_labels=None, **kwargs)
    assert (adapter(**kwargs) - expected).abs().max().item() <= 1e-4


def test_unknown_and_missing_keys_are_listed_and_nothing_is_written(tmp_path):
    state = reference_state_dict(DEPTH, HEADS, HEAD_DIM, PATCH, 10)
    state["pos_embed_table"] = torch.zeros(3)
    del state["transformer_blocks.1.mlp.fc2.bias"]
    write_reference(tmp_path / "ref", state=state)
    with pytest.raises(ConversionError) as error:
        convert_official(tmp_path / "ref", tmp_path / "ours")
    message = str(error.value)
    assert "unknown keys: pos_embed_table" in message
    assert "missing keys: blocks.1.mlp.fc2.bias" in message
    assert not (tmp_path / "ours").exists()


def test_misshapen_weights_are_reported(tmp_path):
    state = reference_state_dict(DEPTH, HEADS, HEAD_DIM, PATCH, 10)
    state["proj_out_1.bias"] = torch.zeros(5)
    write_reference(tmp_path / "ref", state=state)
    with pytest.raises(ConversionError, match=r"shape mismatches: final.modulation.bias: \(5,\) vs \(32,\)"):
        convert_official(tmp_path / "ref", tmp_path / "ours")


def test_adapter_rejects_inputs_it_would_silently_misread(tmp_path):
    write_reference(tmp_path / "ref")
    convert_official(tmp_path / "ref", tmp_path / "ours")
    adapter = OfficialAdapter.from_checkpoint(tmp_path / "ours")
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="latent_size"):
        adapter(
            hidden_states=x, timestep=torch.tensor([1.0]), class_labels=torch.tensor([1]), latent_size=torch.tensor([2])
        )
    with pytest.raises(ValueError, match="pos_embed"):
        adapter(
            hidden_states=x,
            timestep=torch.tensor([1.0]),
            class_labels=torch.tensor([1]),
            pos_embed=reference_pos_embed(4, HEAD_DIM) * 2,
        )


@pytest.mark.slow
def test_cli_converts_and_samples_from_the_converted_checkpoint(tmp_path):
    write_reference(tmp_path / "ref")
    done = cli("pixelflow", "convert-official", tmp_path / "ref", tmp_path / "ours")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "grid.png"
    sampled = cli(
        "pixelflow", "sample", "--checkpoint", tmp_path / "ours", "--out", out, "--classes", "1", "2", "--steps", "2"
    )
    assert sampled.returncode == 0, sampled.stderr
    assert Image.open(out).size == (2 * 34 + 2, 34 + 2)
    failed = cli("pixelflow", "convert-official", tmp_path / "nowhere", tmp_path / "x")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"pixelflow: error: {tmp_path / 'nowhere'}: reference weights not found"
    ]
