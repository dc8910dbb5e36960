"""Image-text training: the frozen T5 encoder, captions and precomputed embeddings through the data path,
caption dropout, text-to-image training on one process and distributed, and prompt sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_tools.text import encode_text, tiny_text_encoder
from pixelflow.cascade import CascadeSchedule, build_training_batch
from pixelflow.config import ModelConfig
from pixelflow.errors import ConfigError
from pixelflow.model import PackedLayout, PixelFlowTransformer
from pixelflow.model.layout import patchify
from pixelflow.model.text_encoder import TextEncoder
from pixelflow.train.text_conditioning import UnitText
from pixelflow.train.trainer import train
from pixelflow.weights import read_weights
from tests.conftest import cli, run_ranks, tiny_config, tiny_overrides

TEXT_DIM = 16


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory, shapes_dataset):
    """A tiny random-weight T5 encoder with a tokenizer trained on the shapes captions."""
    return tiny_text_encoder(str(shapes_dataset), str(tmp_path_factory.mktemp("t5") / "t5"), dim=TEXT_DIM)


def t2i(run_dir, data, encoder, *overrides):
    return tiny_config(
        run_dir,
        data,
        "model.num_classes=0",
        "model.class_dropout=0.0",
        f"model.text_dim={TEXT_DIM}",
        f"text.encoder={encoder}",
        "text.dropout=0.25",
        *overrides,
    )


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_encoder_pads_to_the_longest_caption_and_padding_changes_nothing(text_encoder_dir):
    encoder = TextEncoder(text_encoder_dir, 512, torch.device("cpu"))
    both, mask = encoder.encode(["a red circle", "a green triangle and a blue square"])
    alone, _ = encoder.encode(["a red circle"])
    assert mask[0].sum() == 4 and mask[1].sum() == mask.shape[1] == 8  # words + </s>
    assert torch.allclose(both[0, :4], alone[0], atol=1e-6) and both[0, 4:].abs().max() == 0
    short, short_mask = TextEncoder(text_encoder_dir, 3, torch.device("cpu")).encode(["a green triangle and more"])
    assert short.shape[1] == 3 and short_mask.sum() == 3  # truncated to text.max_tokens


def tiny_text_model() -> PixelFlowTransformer:
    torch.manual_seed(0)
    model = PixelFlowTransformer(
        ModelConfig(depth=2, num_heads=2, head_dim=8, patch_size=2, num_classes=0, text_dim=TEXT_DIM)
    )
    for block in model.blocks:  # the zero-initialised modulation would hide the text path
        torch.nn.init.normal_(block.modulation.weight, std=0.1)
    torch.nn.init.normal_(model.final.proj.weight, std=0.1)
    return model.eval()


def test_masked_text_tokens_do_not_change_outputs():
    model = tiny_text_model()
    images, t = torch.randn(2, 3, 8, 8), torch.rand(2) * 999
    text = torch.randn(2, 3, TEXT_DIM)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    garbage = text.clone()
    garbage[0, 2] = 1e3  # the masked token of sample 0
    longer, longer_mask = torch.cat([text, torch.randn(2, 4, TEXT_DIM)], 1), torch.cat([mask, torch.zeros(2, 4)], 1)
    with torch.no_grad():
        reference = model.forward_images(images, t, None, text, mask)
        assert torch.allclose(model.forward_images(images, t, None, garbage, mask), reference, atol=1e-6)
        assert torch.allclose(model.forward_images(images, t, None, longer, longer_mask.long()), reference, atol=1e-6)
        assert not torch.allclose(model.forward_images(images, t, None, torch.randn_like(text), mask), reference)


def test_packed_stream_with_text_equals_each_image_alone():
    model = tiny_text_model()
    sides = [4, 4, 2, 1]
    images = [torch.randn(1, 3, 2 * s, 2 * s) for s in sides]
    t = torch.rand(4) * 999
    text, mask = torch.randn(4, 5, TEXT_DIM), torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    tokens = torch.cat([patchify(image, 2) for image in images])
    with torch.no_grad():
        packed = model(tokens, PackedLayout.from_sides(sides), t, None, text, mask)
        start = 0
        for i, (side, image) in enumerate(zip(sides, images)):
            alone = model(
                patchify(image, 2),
                PackedLayout.from_sides([side]),
                t[i : i + 1],
                None,
                text[i : i + 1],
                mask[i : i + 1],
            )
            assert torch.allclose(packed[start : start + side * side], alone, atol=1e-5)
            start += side * side


def test_caption_dropout_follows_each_samples_own_draw():
    schedule = CascadeSchedule.build(4)
    images, labels = torch.zeros(400, 3, 16, 16, dtype=torch.uint8), torch.zeros(400, dtype=torch.long)
    stages = [i % 4 for i in range(400)]
    pairs = build_training_batch(images, labels, stages, schedule, 2, 0, 7, list(range(400)))
    again = build_training_batch(images[:100], labels[:100], stages[:100], schedule, 2, 0, 7, list(range(100)))
    by_sample = dict(zip(pairs.order, pairs.draws.tolist()))
    assert all(by_sample[i] == d for i, d in zip(again.order, again.draws.tolist()))  # keyed by sample, not batch
    text = UnitText(
        torch.ones(400, 3, TEXT_DIM),
        torch.ones(400, 3, dtype=torch.long),
        torch.zeros(1, 1, TEXT_DIM),
        torch.ones(1, 1, dtype=torch.long),
        dropout=0.25,
        max_tokens=16,
    )
    embedded, mask = text.micro_batch(torch.tensor(pairs.order), pairs.draws)
    dropped = (mask.sum(1) == 1) & (embedded[:, 0].abs().sum(1) == 0)
    assert torch.equal(dropped, pairs.draws < 0.25)
    assert 0.18 < dropped.float().mean() < 0.32  # 100 of 400 expected


def test_online_and_precomputed_embeddings_train_the_same_and_resume_exactly(
    tmp_path, shapes_dataset, text_encoder_dir
):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(shapes_dataset, data)
    report = encode_text(str(data), text_encoder_dir, progress=False)
    assert (report.encoded, report.skipped) == (6, 0)
    rerun = encode_text(str(data), text_encoder_dir, progress=False)
    assert (rerun.encoded, rerun.skipped) == (0, 6)  # finished shards are kept
    online = train(t2i(tmp_path / "online", data, text_encoder_dir)).run_dir
    precomputed = train(t2i(tmp_path / "pre", data, "null", "text.mode=precomputed")).run_dir
    assert np.allclose(losses(precomputed), losses(online), rtol=1e-3)  # float16 storage
    split = tmp_path / "split"
    train(t2i(split, data, text_encoder_dir, "train.steps=3"))
    train(t2i(split, data, text_encoder_dir))
    assert losses(split) == losses(online)
    for which in ("model", "ema"):
        whole, resumed = read_weights(online, which)[0], read_weights(split, which)[0]
        assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_a_short_text_run_learns(tmp_path, shapes_dataset, text_encoder_dir):
    """Six steps (above) are too few for a loss trend to rise above step-to-step noise; this run is long enough."""
    steps = ["train.steps=60", "train.lr=2e-3", "train.global_batch=16", "checkpoint.every=60", "model.num_heads=4"]
    loss = losses(train(t2i(tmp_path / "run", shapes_dataset, text_encoder_dir, *steps)).run_dir)
    assert np.mean(loss[-10:]) < 0.7 * np.mean(loss[:10])


def test_a_missing_encoder_is_one_error_line_and_touches_nothing(tmp_path, shapes_dataset):
    with pytest.raises(ConfigError, match="text.encoder: .*nowhere: no such directory"):
        train(t2i(tmp_path / "run", shapes_dataset, str(tmp_path / "nowhere")))
    assert not (tmp_path / "run").exists()
    command = [
        "pixelflow",
        "train",
        "configs/demo_t2i.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"data.path={shapes_dataset}",
        "text.encoder=/no/such/t5",
    ]
    done = cli(*command)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "pixelflow: error: text.encoder: /no/such/t5: no such directory (nothing is downloaded; give a local copy)"
    )


@pytest.mark.slow
def test_text_to_image_on_two_and_four_ranks_equals_one_process(tmp_path, shapes_dataset, text_encoder_dir):
    """FSDP2 on 2 ranks (with the encoder FSDP-sharded too) and dp_shard=2 x sp=2 log one process's losses."""
    trajectories = []
    for procs, layout in [
        (1, []),
        (2, ["parallel.dp_shard=2", "data.num_workers=2", "text.shard_encoder=true"]),
        (4, ["parallel.dp_shard=2", "parallel.sp=2"]),
    ]:
        run_dir = tmp_path / f"ranks-{procs}"
        overrides = tiny_overrides(
            run_dir,
            shapes_dataset,
            f"text.encoder={text_encoder_dir}",
            f"model.text_dim={TEXT_DIM}",
            "train.steps=4",
            "text.dropout=0.25",
            *layout,
        )
        run_ranks(["-m", "pixelflow", "train", "configs/demo_t2i.yaml", *overrides], procs)
        trajectories.append(losses(run_dir))
    for trajectory in trajectories[1:]:
        assert np.allclose(trajectory, trajectories[0], rtol=1e-5, atol=0)


def test_prompt_sampling_from_a_trained_run_and_a_converted_official_checkpoint(
    tmp_path, shapes_dataset, text_encoder_dir
):
    from pixelflow.compat import convert_official
    from tests.test_compat import write_reference

    run_dir = train(t2i(tmp_path / "run", shapes_dataset, text_encoder_dir, "train.steps=2")).run_dir
    write_reference(tmp_path / "official", text_dim=TEXT_DIM, classes=0)
    convert_official(tmp_path / "official", tmp_path / "converted")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    for checkpoint in (run_dir, tmp_path / "converted"):
        out = tmp_path / f"{checkpoint.name}.png"
        command = [
            "pixelflow",
            "sample",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--prompt-file",
            str(prompts),
            "--prompt",
            "a green triangle",
            "--negative-prompt",
            "a yellow",
            "--text-encoder",
            text_encoder_dir,
            "--steps",
            "2",
            "--per-class",
            "2",
        ]
        done = cli(*command)
        assert done.returncode == 0, done.stderr[-3000:]
        from PIL import Image

        assert Image.open(out).size == (3 * 34 + 2, 2 * 34 + 2)  # 3 prompts x 2 images of 32 px, 2 px gutters
    done = cli(
        "pixelflow",
        "sample",
        "--checkpoint",
        str(run_dir),
        "--out",
        str(tmp_path / "x.png"),
        "--text-encoder",
        text_encoder_dir,
    )
    assert done.returncode == 2 and "needs --prompt" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["online", "precomputed"])
def test_text_units_of_one_sample_exchange_and_train_like_one_process(tmp_path, shapes_dataset, text_encoder_dir, mode):
    """global_batch=3 on 2 data ranks plans a unit of one sample: its exchanged row (image, label, caption or
    embedding) has a width that is no multiple of 8, which the label's int64 view used to refuse."""
    data = tmp_path / "data"
    import shutil

    shutil.copytree(shapes_dataset, data)
    if mode == "precomputed":
        encode_text(str(data), text_encoder_dir, progress=False)
    trajectories = []
    for procs in (1, 2):
        run_dir = tmp_path / f"ranks-{procs}"
        overrides = tiny_overrides(
            run_dir,
            data,
            f"text.encoder={text_encoder_dir}",
            f"text.mode={mode}",
            f"model.text_dim={TEXT_DIM}",
            "train.steps=3",
            "train.global_batch=3",
            f"parallel.dp_shard={procs}",
        )
        run_ranks(["-m", "pixelflow", "train", "configs/demo_t2i.yaml", *overrides], procs)
        trajectories.append(losses(run_dir))
    assert len(trajectories[0]) == 3 and np.allclose(trajectories[1], trajectories[0], rtol=1e-5, atol=0)


def test_embeddings_of_another_encoder_are_encoded_again_and_never_read_as_the_models(
    tmp_path, shapes_dataset, text_encoder_dir
):
    from pixelflow.errors import ShardFormatError
    from tests.conftest import cli

    data = tmp_path / "data"
    import shutil

    shutil.copytree(shapes_dataset, data)
    done = cli("data_tools", "encode-text", data, "--encoder", text_encoder_dir, "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]  # a successful encode-text exits 0
    assert json.loads(done.stdout) == {"shards": 6, "encoded": 6, "skipped": 0}
    wider = tiny_text_encoder(str(data), str(tmp_path / "t5-32"), dim=32)
    assert (encode_text(str(data), wider, progress=False).encoded, 6) == (6, 6)  # the fingerprint names the encoder
    precomputed = ["text.mode=precomputed", "text.encoder=null"]
    with pytest.raises(ConfigError, match=f"^model.text_dim = {TEXT_DIM} but the embeddings in .* are 32-wide tokens$"):
        train(t2i(tmp_path / "run", data, text_encoder_dir, *precomputed))
    encode_text(str(data), text_encoder_dir, part=(0, 2), progress=False)  # half the shards back to 16 wide
    with pytest.raises(ShardFormatError, match=r"shard-00000[135]\.f16\.json: 32-wide embeddings, the model takes"):
        train(t2i(tmp_path / "run", data, text_encoder_dir, *precomputed))


def test_a_compiled_text_model_builds_few_graphs_however_caption_lengths_vary():
    """50 steps of captions from 1 to 60 tokens through UnitText and a compiled model (dynamo counting
    frames, no codegen): graphs are bounded by the length buckets, not by the distinct longest captions."""
    from torch._dynamo.testing import CompileCounter

    from pixelflow.parallel.parallelize import apply_compile

    torch._dynamo.reset()
    cfg = ModelConfig(depth=2, num_heads=2, head_dim=8, patch_size=2, num_classes=0, text_dim=TEXT_DIM)
    model = PixelFlowTransformer(cfg).eval()
    counter = CompileCounter()
    apply_compile(model, backend=counter)
    layout = PackedLayout.from_sides([8, 8])
    tokens = torch.randn(layout.num_tokens, 3 * 2 * 2)
    generator = torch.Generator().manual_seed(0)
    longest = set()
    with torch.no_grad():
        for _ in range(50):
            lengths = torch.randint(1, 61, (2,), generator=generator)
            longest.add(int(lengths.max()))
            embeddings = torch.randn(2, int(lengths.max()), TEXT_DIM)
            mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
            text = UnitText(embeddings, mask, torch.zeros(1, 1, TEXT_DIM), torch.ones(1, 1), 0.0, max_tokens=64)
            caption, caption_mask = text.micro_batch(torch.arange(2), torch.ones(2))
            model(tokens, layout, torch.full((2,), 500.0), text=caption, text_mask=caption_mask)
    buckets = {8, 16, 32, 64}
    assert len(longest) > 2 * len(buckets)  # padding to the longest caption would compile this many graphs
    assert 0 < counter.frame_count <= 2 * len(buckets)  # one graph per bucket (per block at most)
    torch._dynamo.reset()
