"""parallelize(): activation checkpointing and torch.compile change speed and memory, not results."""

from __future__ import annotations

import copy

import pytest
import torch

from pixelflow.cascade import CascadeSchedule, build_training_batch, per_sequence_mse
from pixelflow.config import load_config
from pixelflow.model import PixelFlowTransformer
from pixelflow.parallel import parallelize
from pixelflow.parallel.parallelize import checkpointed_blocks
from tests.conftest import REPO


def config(*overrides: str):
    return load_config(
        REPO / "configs" / "demo.yaml",
        ["run_dir=x", "data.path=x", "model.depth=3", "model.num_heads=2", "model.head_dim=16", *overrides],
    )


def loss_and_grads(model: PixelFlowTransformer, seed: int = 0):
    schedule = CascadeSchedule.build(4)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    batch = build_training_batch(images, torch.arange(8), [0, 1, 2, 3] * 2, schedule, 4, seed, 1, range(8))
    loss = per_sequence_mse(
        model(batch.tokens, batch.layout, batch.timesteps, batch.labels), batch.targets, batch.layout
    ).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def randomised(cfg):
    torch.manual_seed(0)
    model = PixelFlowTransformer(cfg.model)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    return model


def test_checkpointed_block_choice():
    assert checkpointed_blocks("none", 6) == []
    assert checkpointed_blocks("full", 3) == [0, 1, 2]
    assert checkpointed_blocks("every_2", 5) == [0, 2, 4]


@pytest.mark.parametrize("mode", ["full", "every_2"])
def test_activation_checkpointing_keeps_loss_grads_and_names(mode):
    cfg = config(f"parallel.activation_checkpointing={mode}")
    plain = randomised(cfg)
    checkpointed = parallelize(copy.deepcopy(plain), cfg, torch.device("cpu"))
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    loss, grads = loss_and_grads(plain)
    loss_ac, grads_ac = loss_and_grads(checkpointed)
    assert torch.equal(loss, loss_ac)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ac[name], atol=1e-6), name


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    cfg = config("parallel.compile=true", "parallel.activation_checkpointing=full")
    plain = randomised(cfg)
    compiled = parallelize(copy.deepcopy(plain), cfg, torch.device("cpu"))
    assert list(compiled.state_dict()) == list(plain.state_dict())
    loss, grads = loss_and_grads(plain)
    loss_compiled, grads_compiled = loss_and_grads(compiled)
    assert torch.allclose(loss, loss_compiled, rtol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_compiled[name], atol=1e-5, rtol=1e-4), name


def test_fused_qkv_keeps_loss_grads_and_checkpoint_names():
    cfg = config("parallel.fused_qkv=true")
    plain = randomised(cfg)
    fused = parallelize(copy.deepcopy(plain), cfg, torch.device("cpu"))
    assert all(block.attn.fused_qkv for block in fused.blocks)
    assert list(fused.state_dict()) == list(plain.state_dict())  # the same checkpoints load and save
    loss, grads = loss_and_grads(plain)
    loss_fused, grads_fused = loss_and_grads(fused)
    assert torch.equal(loss, loss_fused)  # the same products, one matmul
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_fused[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize(
    ("overrides", "device", "fused"),
    [
        ([], "cpu", False),  # CPU trajectories stay bit-identical to the three-matmul path's
        ([], "cuda", True),
        (["parallel.tp=2"], "cuda", False),  # megatron-core's layers carry their own collectives
        (["engine=deepspeed"], "cuda", False),  # ZeRO-3 gathers weights per layer call
        (["parallel.float8=true"], "cuda", False),  # Float8Linear casts in its own forward
    ],
)
def test_fused_qkv_is_on_by_default_where_the_layers_are_plain(overrides, device, fused):
    from pixelflow.config import fused_qkv_enabled

    assert fused_qkv_enabled(config(*overrides), device) is fused


def test_float8_converts_the_blocks_linears_keeps_names_and_stays_close_to_full_precision():
    """torchao's FP8 path (emulated on CPU: FP8 rounding, ordinary matmuls) on the blocks' linears only."""
    from torchao.float8.float8_linear import Float8Linear

    from pixelflow.parallel.parallelize import apply_float8

    plain = randomised(config())
    fp8 = copy.deepcopy(plain)
    apply_float8(fp8, torch.device("cpu"), emulate=True)
    converted = {name for name, module in fp8.named_modules() if isinstance(module, Float8Linear)}
    assert converted and all(name.startswith("blocks.") for name in converted)
    assert "blocks.0.attn.q_proj" in converted and "blocks.0.mlp.fc1" in converted
    assert list(fp8.state_dict()) == list(plain.state_dict())
    loss, grads = loss_and_grads(plain)
    loss_fp8, grads_fp8 = loss_and_grads(fp8)
    assert abs(loss_fp8 - loss) / loss < 0.02  # e4m3 rounding of activations and weights, e5m2 of gradients
    cosines = [torch.cosine_similarity(g.flatten(), grads_fp8[n].flatten(), dim=0) for n, g in grads.items()]
    assert min(cosines) > 0.9 and sorted(cosines)[len(cosines) // 2] > 0.99


def test_float8_is_refused_in_one_line_without_fp8_hardware(tmp_path, shapes_dataset, capsys):
    from pixelflow.cli import main
    from tests.conftest import error_lines, tiny_overrides

    assert main(["train", "configs/demo.yaml", *tiny_overrides(tmp_path, shapes_dataset, "parallel.float8=true")]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "pixelflow: error: parallel.float8: FP8 matmuls need a CUDA GPU of compute capability 8.9 or newer; this "
        "run is on cpu"
    ]


def test_the_world_flushes_subnormal_floats_on_the_cpu():
    from pixelflow.parallel.world import init_world

    init_world(load_config(REPO / "configs" / "demo.yaml", ["data.path=unused"]), "cpu")
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0  # subnormal: computed as zero, not slowly
