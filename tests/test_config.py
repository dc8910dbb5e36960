"""Config loading: the shipped configs load, and every kind of mistake fails with one clear line."""

from __future__ import annotations

import re

import pytest

from pixelflow.config import load_config
from pixelflow.errors import ConfigError
from pixelflow.parallel.world import layout_for
from tests.conftest import REPO, cli


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


BASE = "run_dir: runs/x\ndata: {path: d, resolution: 64}\ntrain: {steps: 3}\n"


def test_shipped_configs_load():
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.data.resolution % (demo.model.patch_size * 2 ** (demo.cascade.stages - 1)) == 0
    xl = load_config(REPO / "configs" / "pixelflow_xl_c2i_256.yaml")
    assert (xl.model.depth, xl.model.num_heads, xl.model.head_dim) == (28, 16, 72)
    assert (xl.data.resolution, xl.cascade.stages, xl.model.patch_size, xl.model.num_classes) == (256, 4, 4, 1000)


def test_overrides_apply(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.steps=7", "model.depth=3", "sample.cfg_ramp=[0,0.5,0.5,1]"])
    assert (cfg.train.steps, cfg.model.depth, cfg.sample.cfg_ramp) == (7, 3, [0, 0.5, 0.5, 1])


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        (BASE + "model: {depht: 3}\n", [], "cfg.yaml: unknown key 'model.depht'"),
        (BASE.replace("steps: 3", "steps: three"), [], "cfg.yaml: 'train.steps': Value 'three'"),
        (
            BASE.replace("resolution: 64", "resolution: 100"),
            [],
            "cfg.yaml: 'data.resolution' = 100 must be a positive multiple of patch_size * 2^(stages-1) = 32",
        ),
        (BASE, ["data.resolution=48"], "command line override: 'data.resolution' = 48 must be a positive multiple"),
        (BASE, ["trian.steps=3"], "command line override 'trian.steps=3': unknown key 'trian'"),
        (BASE, ["train.lr_schedule=linear"], "'train.lr_schedule' = 'linear' must be constant or cosine"),
        (BASE, ["train.steps"], "override 'train.steps' is not of the form key=value"),
        (
            BASE,
            ["train.micro_tokens=100"],
            "'train.micro_tokens' gives 100 tokens per micro-batch on each rank, less than one full-resolution sample "
            "needs (256 tokens over parallel.sp = 1 ranks)",
        ),
        (BASE, ["plan.stage_weights=[1,1]"], "'plan.stage_weights' = [1.0, 1.0] must be 4 non-negative numbers"),
        (BASE, ["model.head_dim=70"], "'model.head_dim' = 70 must be a positive multiple of 4"),
        (BASE, ["wandb.mode=loud"], "'wandb.mode' = 'loud' must be disabled, offline or online"),
        (BASE, ["sample.cfg_ramp=[0,1]"], "'sample.cfg_ramp' must have one value per stage (4)"),
        ("run_dir: x\ndata: {path: d}\n", [], "'train.steps' is required but not set"),
        ("run_dir: x\n  bad: [\n", [], "cfg.yaml:2: not valid YAML"),
        (BASE + "train: {lr: 1}\n", [], "not valid YAML: found duplicate key train"),
        ("- a\n- b\n", [], "the top level must be a mapping"),
    ],
)
def test_bad_config_fails_with_clear_message(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), overrides)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    path = write(tmp_path, BASE.replace("steps: 3", "steps: 3, stpes: 3"))
    result = cli("pixelflow", "train", path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"pixelflow: error: {path}: unknown key 'train.stpes'"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["parallel.sp=3"], "'parallel.sp' = 3 must divide model.num_heads = 16"),
        (["engine=deepspeed", "parallel.sp=2"], "'engine' = deepspeed runs ZeRO-3 data parallel only"),
        (["parallel.tp=4", "parallel.sp=8"], "'parallel.tp' = 4 x parallel.sp = 8 must divide model.num_heads = 16"),
        (["engine=ddp"], "'engine' = 'ddp' must be fsdp or deepspeed"),
        (["parallel.activation_checkpointing=some"], "must be none, full or every_<k>"),
    ],
)
def test_bad_parallel_settings_fail_clearly(tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write(tmp_path, BASE), overrides)


def test_process_count_must_match_the_mesh(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["parallel.dp_shard=2", "parallel.sp=2", "train.global_batch=8"])
    assert layout_for(cfg.parallel, 4) == (1, 2, 2, 1)
    with pytest.raises(ConfigError, match=re.escape("dp_shard x sp x tp = 1 x 2 x 2 x 1 does not match the 2")):
        layout_for(cfg.parallel, 2)
    automatic = load_config(write(tmp_path, BASE), ["parallel.sp=2", "train.global_batch=6"])
    assert layout_for(automatic.parallel, 6) == (1, 3, 2, 1)
    assert layout_for(automatic.parallel, 8) == (1, 4, 2, 1)  # the planner deals 6 samples over 4 data ranks by cost
    with_tp = load_config(write(tmp_path, BASE), ["parallel.tp=2", "parallel.sp=2"])
    assert layout_for(with_tp.parallel, 8) == (1, 2, 2, 2)


def test_the_old_name_sample_cfg_still_loads_as_guidance_scale_with_a_warning(tmp_path, caplog):
    import logging

    from pixelflow.config import from_yaml, to_yaml

    old = tmp_path / "old.yaml"
    old.write_text((REPO / "configs" / "demo.yaml").read_text().replace("guidance_scale: 3.0", "cfg: 3.5"))
    with caplog.at_level(logging.WARNING):
        assert load_config(old).sample.guidance_scale == 3.5
        assert load_config(REPO / "configs" / "demo.yaml", ["sample.cfg=1.5"]).sample.guidance_scale == 1.5
    assert f"{old}: 'sample.cfg' is now 'sample.guidance_scale'" in caplog.text
    assert "command line override: 'sample.cfg' is now 'sample.guidance_scale'" in caplog.text
    saved = to_yaml(load_config(REPO / "configs" / "demo.yaml")).replace("guidance_scale:", "cfg:")
    assert from_yaml(saved).sample.guidance_scale == 3.0  # a checkpoint written before the rename
    both = tmp_path / "both.yaml"
    both.write_text(old.read_text().replace("cfg: 3.5", "cfg: 3.5\n  guidance_scale: 2.0"))
    with pytest.raises(ConfigError, match=f"^{both}: 'sample.cfg' and 'sample.guidance_scale' are the same setting"):
        load_config(both)
    with pytest.raises(ConfigError, match=r"^command line override: 'sample.guidance_scale' = nan must be"):
        load_config(REPO / "configs" / "demo.yaml", ["sample.cfg=nan"])


@pytest.mark.parametrize("override", ["parallel.compile=true", "parallel.activation_checkpointing=full"])
def test_deepspeed_refuses_the_fsdp_engines_options_instead_of_ignoring_them(override):
    with pytest.raises(ConfigError, match="= deepspeed runs its own module hooks: parallel.compile and parallel"):
        load_config(REPO / "configs" / "demo.yaml", ["engine=deepspeed", override])
