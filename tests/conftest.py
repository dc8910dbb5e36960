"""Shared fixtures: a small synthetic shard dataset and a tiny config that trains in seconds on CPU."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_tools.synthetic import write_synthetic_dataset  # noqa: E402
from pixelflow.config import Config, load_config  # noqa: E402
from pixelflow.quality.inception import random_inception  # noqa: E402
from tests.s3 import CREDENTIALS, MotoServer, free_port  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def same_start():
    """Every test starts from the same global state whatever ran before it: seeded RNGs and torch's default
    handling of subnormal floats (the trainer and the sampler switch it for their process)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_flush_denormal(False)
    yield


def pytest_collection_modifyitems(config, items):
    """PIXELFLOW_TEST_SHUFFLE=SEED runs the modules, and the tests inside each, in a seeded random order: a
    test that passes only after (or before) another shows up."""
    seed = os.environ.get("PIXELFLOW_TEST_SHUFFLE")
    if not seed:
        return
    rng = random.Random(int(seed))
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.module.__name__, []).append(item)
    order = list(modules.values())
    rng.shuffle(order)
    for tests in order:
        rng.shuffle(tests)
    items[:] = [item for tests in order for item in tests]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto_server subprocess on 127.0.0.1) with a bucket `pixelflow-test`, for the session."""
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    with MotoServer() as server:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=server.endpoint).mkdir("pixelflow-test")
        yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    """192 synthetic 40x40 samples in 6 shards of 32."""
    root = tmp_path_factory.mktemp("shapes")
    write_synthetic_dataset(str(root), count=192, per_shard=32, size=40, seed=1)
    return root


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """A random-weight FID Inception, initialised so activations neither vanish nor explode over its depth."""
    model = random_inception(0)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(model.state_dict(), path)
    return path


def tiny_overrides(run_dir: Path, data: Path, *overrides: str) -> list[str]:
    """configs/demo.yaml shrunk to a 2-block, 32-pixel model that steps in milliseconds."""
    return [
        f"run_dir={run_dir}",
        f"data.path={data}",
        "data.resolution=32",
        "data.num_workers=0",
        "data.shuffle_block=16",
        "data.expand_ratio=1.125",
        "model.depth=2",
        "model.num_heads=2",
        "model.head_dim=16",
        "train.global_batch=8",
        "train.steps=6",
        "train.log_every=1",
        "train.warmup_steps=2",
        "train.lr_schedule=constant",
        "checkpoint.every=3",
        "checkpoint.keep=5",
        *overrides,
    ]


def tiny_config(run_dir: Path, data: Path, *overrides: str) -> Config:
    return load_config(REPO / "configs" / "demo.yaml", tiny_overrides(run_dir, data, *overrides))


def cli(module: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS...` (pixelflow, data_tools, launch) from the repository root, its output captured
    and its exit status left to the test."""
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def error_lines(stderr: str, prog: str = "pixelflow") -> list[str]:
    """The lines a command printed as its error (`PROG: error: ...`, `PROG: internal error: ...`)."""
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: ") and "error" in line]


def run_ranks(command: list[str], procs: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python COMMAND...` as one process, or under torchrun as `procs` ranks, from the repository root (env:
    this one with OMP_NUM_THREADS=1 unless given); fails the test with the end of stderr unless it exits 0."""
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(free_port())]
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launcher + command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
