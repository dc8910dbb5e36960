"""Run configuration: a dataclass schema filled from omegaconf YAML plus `key=value` overrides.

Every mistake a user can make in a config (unknown key, wrong type, impossible value) is reported as one
`ConfigError` line naming the key and where it came from, before anything expensive starts.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import ClassVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pixelflow.errors import ConfigError

log = logging.getLogger(__name__)
Problem = tuple[str, str]  # (dotted key, reason): the first impossible value a check found


def failed(checks: list[tuple[bool, str, str]]) -> Problem | None:
    """(key, reason) of the first (ok, key, reason) that is not ok."""
    for ok, key, reason in checks:
        if not ok:
            return key, reason
    return None


# One set of sampling-option checks for the config (sample.*), `pixelflow sample` and `pixelflow eval`.
def steps_problem(steps: int) -> str | None:
    return None if steps >= 1 else "must be at least 1"


def guidance_problem(scale: float) -> str | None:
    return None if math.isfinite(scale) and scale >= 0 else "must be a finite number >= 0"


@dataclass
class ModelConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": ("auto", "sdpa_runs", "sdpa_dense", "varlen", "flex", "flash")
    }  # allowed values: checked, and named in errors
    depth: int = 28
    num_heads: int = 16
    head_dim: int = 72
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 1000  # class-conditional; the extra row num_classes is the null (CFG) class
    class_dropout: float = 0.1
    mlp_ratio: float = 4.0
    attention_bias: bool = True
    text_dim: int | None = None  # width of text-encoder tokens for cross-attention (text-to-image); None = off
    attention: str = "auto"  # auto | sdpa_runs | sdpa_dense | varlen | flex | flash (see model/attention.py)

    def problem(self) -> tuple[str, str] | None:
        """This section's first impossible value as (key within the section, reason), or None."""
        return failed(
            [
                (self.patch_size >= 1, "patch_size", f"= {self.patch_size} must be at least 1"),
                (self.depth >= 1, "depth", f"= {self.depth} must be at least 1"),
                (self.num_heads >= 1, "num_heads", f"= {self.num_heads} must be at least 1"),
                (
                    self.head_dim % 4 == 0 and self.head_dim > 0,
                    "head_dim",
                    f"= {self.head_dim} must be a positive multiple of 4 (2D RoPE)",
                ),
                (self.num_classes >= 0, "num_classes", f"= {self.num_classes} must not be negative"),
                (0.0 <= self.class_dropout < 1.0, "class_dropout", f"= {self.class_dropout} must be in [0, 1)"),
                (self.mlp_ratio > 0, "mlp_ratio", f"= {self.mlp_ratio} must be positive"),
                (self.text_dim is None or self.text_dim > 0, "text_dim", f"= {self.text_dim} must be positive or null"),
            ]
        )


@dataclass
class CascadeConfig:
    stages: int = 4
    gamma: float = -1.0 / 3.0  # correlation of the 2x2 block noise used when moving up a stage
    num_train_timesteps: int = 1000

    def problem(self) -> tuple[str, str] | None:
        """This section's first impossible value as (key within the section, reason), or None."""
        return failed(
            [
                (self.stages >= 1, "stages", f"= {self.stages} must be at least 1"),
                (self.gamma < 0, "gamma", f"= {self.gamma} must be negative (block-noise correlation)"),
                (self.num_train_timesteps >= self.stages, "num_train_timesteps", "must be at least cascade.stages"),
            ]
        )


@dataclass
class SourceConfig:
    """One dataset of a mixture (`data.sources`): each step's global batch takes `weight / sum of weights`
    of its samples from it (floor or ceiling)."""

    path: str = MISSING  # directory (or s3://bucket/prefix) holding manifest.json (and its shards or their index)
    weight: float = 1.0
    name: str = ""  # in metrics as loss_source_<name>; default: the path's last folder
    embeddings: str | None = None  # its precomputed caption embeddings (default: <path>/text-embeddings)

    @property
    def label(self) -> str:
        return self.name or self.path.rstrip("/").rsplit("/", 1)[-1]

    def problem(self) -> tuple[str, str] | None:
        return failed(
            [
                (bool(self.path), "path", "must name a dataset directory or s3:// prefix"),
                (
                    math.isfinite(self.weight) and self.weight > 0,
                    "weight",
                    f"= {self.weight} must be a positive number",
                ),
                (
                    bool(re.fullmatch(r"[\w.-]+", self.label)),
                    "name",
                    f"= '{self.label}' must be letters, digits, _ . -",
                ),
            ]
        )


@dataclass
class ResolutionPhase:
    """Steps up to `until_step` train at `resolution` (data.resolution_schedule)."""

    until_step: int = MISSING
    resolution: int = MISSING


@dataclass
class DataConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "resize_filter": ("bicubic", "lanczos")
    }  # allowed values: checked, and named in errors
    path: str = ""  # directory (or s3://bucket/prefix) holding manifest.json and the shards
    sources: list[SourceConfig] = field(default_factory=list)  # instead of path: a mixture of datasets
    # progressive resolution: earlier phases at lower (or other) crop sizes, then data.resolution (the
    # model's: sampling and eval use it), e.g. [{until_step: 20000, resolution: 256}] before 512
    resolution_schedule: list[ResolutionPhase] = field(default_factory=list)
    resolution: int = 256
    num_workers: int = 2
    shuffle_block: int = 1000  # samples shuffled together inside one reading lane
    lanes: int = 0  # reading lanes (fixed for the run's life); 0 = ranks x workers at the first start
    endpoint_url: str | None = None  # S3-compatible endpoint; credentials come from the AWS environment
    retries: int = 5  # attempts per storage read before the run stops with an error naming the shard
    retry_wait: float = 0.5  # seconds before the first retry, doubling up to 30
    max_pixels: int = 50_000_000  # images that would decode to more pixels are skipped (read from the header)
    max_bad_fraction: float = 0.2  # stop when more of the recent samples than this cannot be decoded
    # the shorter side is resized to expand_ratio x resolution before the random square crop (the reference:
    # 1.125, i.e. 288 for 256: zoom and position jitter); 1.0 = resize to the crop size
    expand_ratio: float = 1.125
    resize_filter: str = "bicubic"  # bicubic (antialiased, fast) | lanczos (Pillow's, as the reference)

    def problem(self) -> tuple[str, str] | None:
        """This section's first impossible value as (key within the section, reason), or None."""
        return (
            failed(
                [
                    (self.num_workers >= 0, "num_workers", f"= {self.num_workers} must not be negative"),
                    (self.shuffle_block >= 1, "shuffle_block", f"= {self.shuffle_block} must be at least 1"),
                    (self.lanes >= 0, "lanes", f"= {self.lanes} must not be negative"),
                    (self.retries >= 1, "retries", f"= {self.retries} must be at least 1"),
                    (self.retry_wait >= 0, "retry_wait", f"= {self.retry_wait} must not be negative"),
                    (
                        self.max_pixels >= self.resolution**2,
                        "max_pixels",
                        f"= {self.max_pixels} must be at least resolution^2",
                    ),
                    (
                        0 <= self.max_bad_fraction < 1,
                        "max_bad_fraction",
                        f"= {self.max_bad_fraction} must be in [0, 1)",
                    ),
                    (1.0 <= self.expand_ratio <= 4.0, "expand_ratio", f"= {self.expand_ratio} must be in [1, 4]"),
                    (bool(self.path) or bool(self.sources), "path", "must name a dataset directory or s3:// prefix"),
                    (
                        not (self.path and self.sources),
                        "sources",
                        "and data.path are two ways to name the data: give one",
                    ),
                ]
            )
            or self.sources_problem()
            or self.schedule_problem()
        )

    def schedule_problem(self) -> tuple[str, str] | None:
        """The first impossible phase of the resolution schedule, or None."""
        previous = 0
        for index, phase in enumerate(self.resolution_schedule):
            key = f"resolution_schedule.{index}"
            if phase.until_step <= previous:
                return f"{key}.until_step", f"= {phase.until_step} must be above the phase before's ({previous})"
            if not 0 < phase.resolution**2 <= self.max_pixels:
                return f"{key}.resolution", f"= {phase.resolution} must be positive, its square at most max_pixels"
            previous = phase.until_step
        return None

    def resolution_at(self, step: int) -> int:
        """The crop size of a step: its phase's, or data.resolution after the schedule."""
        return next((p.resolution for p in self.resolution_schedule if step <= p.until_step), self.resolution)

    @property
    def resolutions(self) -> list[int]:
        """Every crop size a run trains at."""
        return [*(phase.resolution for phase in self.resolution_schedule), self.resolution]

    def sources_problem(self) -> tuple[str, str] | None:
        """The first impossible value among the mixture's sources, or None."""
        labels = [source.label for source in self.sources]
        for index, source in enumerate(self.sources):
            found = source.problem()
            if found is not None:
                return f"sources.{index}.{found[0]}", found[1]
            if labels.index(labels[index]) != index:
                return f"sources.{index}.name", f"= '{labels[index]}' names two sources (give each its own name)"
        return None

    def datasets(self) -> list[SourceConfig]:
        """The sources a run reads: the mixture, or data.path as the one source."""
        return list(self.sources) if self.sources else [SourceConfig(path=self.path)]


@dataclass
class TrainConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "lr_schedule": ("constant", "cosine"),
        "precision": ("auto", "fp32", "bf16"),
        "device": ("auto", "cpu", "cuda"),
        "nonfinite": ("stop", "skip_step"),
    }  # allowed values: checked, and named in errors
    steps: int = MISSING
    global_batch: int = 256
    # token budget of one forward/backward per rank (memory): micro_tokens, else micro_batch full-resolution
    # images' worth of tokens; both 0 = each rank's whole share at once (see plan: and data/planner.py)
    micro_batch: int = 0
    micro_tokens: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warmup: constant (the paper) | cosine (down to min_lr at the last step)
    min_lr: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    log_every: int = 10
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    # signals that stop the run after the current step with a committed checkpoint (exit status 75): a
    # scheduler's (SIGTERM, SIGUSR2 before a time limit) and Ctrl-C's
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR2", "SIGINT"])
    # longest wait in a collective for another rank (a hung or stopped rank ends the job after this long)
    collective_timeout_s: float = 600.0
    log_sample_keys: bool = False  # write the keys each data rank trained on per step (sample_keys/)
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop (one line, nothing saved) | skip_step
    peak_tflops: float = 0.0  # per device, for the logged MFU (e.g. 790 on an H200 in bf16); 0 = no MFU

    def problem(self) -> tuple[str, str] | None:
        """This section's first impossible value as (key within the section, reason), or None."""
        return failed(
            [
                (self.steps >= 1, "steps", f"= {self.steps} must be at least 1"),
                (self.global_batch >= 1, "global_batch", f"= {self.global_batch} must be at least 1"),
                (self.micro_batch >= 0, "micro_batch", f"= {self.micro_batch} must not be negative"),
                (self.peak_tflops >= 0, "peak_tflops", f"= {self.peak_tflops} must not be negative"),
                (
                    self.collective_timeout_s > 0,
                    "collective_timeout_s",
                    f"= {self.collective_timeout_s} must be positive",
                ),
                (self.micro_tokens >= 0, "micro_tokens", f"= {self.micro_tokens} must not be negative"),
                (self.lr > 0, "lr", f"= {self.lr} must be positive"),
                (self.weight_decay >= 0, "weight_decay", f"= {self.weight_decay} must not be negative"),
                (
                    len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "betas",
                    "must be two numbers in [0, 1)",
                ),
                (self.warmup_steps >= 0, "warmup_steps", f"= {self.warmup_steps} must not be negative"),
                (0 <= self.min_lr <= self.lr, "min_lr", f"= {self.min_lr} must be in [0, train.lr]"),
                (self.grad_clip > 0, "grad_clip", f"= {self.grad_clip} must be positive"),
                (0.0 <= self.ema_decay < 1.0, "ema_decay", f"= {self.ema_decay} must be in [0, 1)"),
                (self.log_every >= 1, "log_every", f"= {self.log_every} must be at least 1"),
                (
                    all(
                        name.startswith("SIG")
                        and isinstance(getattr(signal, name, None), signal.Signals)
                        and name not in ("SIGKILL", "SIGSTOP")
                        for name in self.stop_signals
                    ),
                    "stop_signals",
                    f"= {list(self.stop_signals)} must name catchable signals, e.g. [SIGTERM, SIGUSR2]",
                ),
            ]
        )


@dataclass
class TextConfig:
    """Text conditioning (text-to-image models: model.text_dim set)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "mode": ("online", "precomputed")
    }  # allowed values: checked, and named in errors
    encoder: str | None = None  # local directory with a T5 encoder and its tokenizer (never downloaded)
    max_tokens: int = 512  # captions are truncated to this many tokens (the reference's length)
    mode: str = "online"  # online: encode each step's captions | precomputed: read `pixelflow-data encode-text`
    embeddings: str | None = None  # where encode-text wrote (default: <data.path>/text-embeddings)
    dropout: float = 0.1  # share of samples trained with the empty caption (classifier-free guidance)
    shard_encoder: bool = False  # FSDP-shard the frozen encoder over the data ranks instead of replicating it

    def problem(self) -> tuple[str, str] | None:
        """This section's first impossible value as (key within the section, reason), or None."""
        return failed(
            [
                (self.max_tokens >= 1, "max_tokens", f"= {self.max_tokens} must be at least 1"),
                (0.0 <= self.dropout < 1.0, "dropout", f"= {self.dropout} must be in [0, 1)"),
            ]
        )


@dataclass
class PlanConfig:
    """How the planner shares each step's stages and work out (pixelflow/data/planner.py)."""

    stage_weights: list[float] | None = None  # share of each stage in the global batch; None = uniform
    # per-token cost that does not scale with d^2 or L^2 (norms, modulation, elementwise), in FLOP-equivalents
    # per token, channel and block; benchmarks/planner.py --calibrate measures it (this: a 2-core CPU)
    token_overhead: float = 5000.0

    def problem(self) -> tuple[str, str] | None:
        """This section's first impossible value as (key within the section, reason), or None."""
        weights = self.stage_weights
        return failed(
            [
                (
                    weights is None or (min(weights, default=0) >= 0 and sum(weights) > 0),
                    "stage_weights",
                    f"= {weights} must be non-negative numbers (one per stage), not all 0",
                ),
                (self.token_overhead >= 0, "token_overhead", f"= {self.token_overhead} must not be negative"),
            ]
        )


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # CUDA graphs need static shapes; stages vary
SAMPLING_COMPILE_MODES = (*COMPILE_MODES, "reduce-overhead")  # a sampler's shapes are fixed per stage


@dataclass
class ParallelConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "compile_mode": COMPILE_MODES,
        "backend": ("auto", "nccl", "gloo"),
    }  # allowed values: checked, and named in errors
    dp_replicate: int = 1  # replicas of the sharded model (HSDP when > 1)
    dp_shard: int = 0  # ranks each replica's parameters are sharded over; 0 = all the rest
    sp: int = 1  # Ulysses sequence parallel: ranks sharing one packed micro-batch (must divide num_heads)
    tp: int = 1  # tensor parallel (megatron-core layers): ranks splitting every block's heads and MLP
    compile: bool | None = None  # torch.compile every transformer block; None = on CUDA (the fsdp engine, tp 1)
    fused_qkv: bool | None = None  # q, k, v as one matmul (same parameters); None = on CUDA (fsdp engine, tp 1)
    compile_mode: str = "default"  # torch.compile's mode: default | max-autotune-no-cudagraphs (slower to build)
    float8: bool = False  # FP8 matmuls in the blocks' linear layers (torchao float8 training; GPUs with FP8)
    backend: str = "auto"  # collectives: auto (nccl on CUDA, gloo on CPU) | gloo (e.g. ranks sharing one GPU)
    activation_checkpointing: str = "none"  # none | full | every_<k> (every k-th block)

    def problem(self) -> tuple[str, str] | None:
        """This section's first impossible value as (key within the section, reason), or None."""
        return failed(
            [
                (self.dp_replicate >= 1, "dp_replicate", "must be at least 1"),
                (self.dp_shard >= 0, "dp_shard", "must be 0 (all remaining ranks) or more"),
                (self.sp >= 1, "sp", "must be at least 1"),
                (self.tp >= 1, "tp", "must be at least 1"),
                (
                    re.fullmatch(r"none|full|every_[1-9]\d*", self.activation_checkpointing) is not None,
                    "activation_checkpointing",
                    f"= '{self.activation_checkpointing}' must be none, full or every_<k>",
                ),
            ]
        )


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep: int = 3  # newest committed checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this, for good; 0 = none
    async_save: bool | None = None  # write in the background after staging to host memory; None = on CUDA

    def problem(self) -> tuple[str, str] | None:
        """This section's first impossible value as (key within the section, reason), or None."""
        return failed(
            [
                (self.every >= 1, "every", f"= {self.every} must be at least 1"),
                (self.keep >= 1, "keep", f"= {self.keep} must be at least 1"),
                (self.keep_every >= 0, "keep_every", f"= {self.keep_every} must not be negative"),
            ]
        )


@dataclass
class SampleConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "solver": ("euler", "dopri5")
    }  # allowed values: checked, and named in errors
    steps_per_stage: int = 30
    guidance_scale: float = 2.4  # the final stage's CFG scale (`cfg` before: still read, with a warning)
    cfg_ramp: list[float] | None = None  # per-stage CFG ramp; None = the paper's (0, 1/6, 2/3, 1)
    shift: float = 1.0
    solver: str = "euler"  # euler (the reference grid) | dopri5 (adaptive, needs torchdiffeq)
    every: int = 0  # during training: a grid from the EMA weights every this many steps (samples/); 0 = never
    count: int = 8  # images in that grid: the first classes in turn, or `prompts` in turn
    prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square"])  # text models

    def problem(self) -> tuple[str, str] | None:
        """This section's first impossible value as (key within the section, reason), or None."""
        steps, guidance = steps_problem(self.steps_per_stage), guidance_problem(self.guidance_scale)
        return failed(
            [
                (not steps, "steps_per_stage", f"= {self.steps_per_stage} {steps}"),
                (not guidance, "guidance_scale", f"= {self.guidance_scale} {guidance}"),
                (self.shift > 0, "shift", f"= {self.shift} must be positive"),
                (self.every >= 0, "every", f"= {self.every} must not be negative"),
                (self.count >= 1, "count", f"= {self.count} must be at least 1"),
            ]
        )


@dataclass
class WandbConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "mode": ("disabled", "offline", "online")
    }  # allowed values: checked, and named in errors
    mode: str = "disabled"  # disabled | offline | online
    project: str = "pixelflow"
    name: str | None = None


@dataclass
class SlurmConfig:
    """Cluster options for `pixelflow-launch submit` (the trainer itself ignores them)."""

    nodes: int = 1
    tasks_per_node: int = 1  # one task (rank) per GPU
    gpus_per_node: int = 0
    cpus_per_task: int = 8
    mem_gb: float = 0  # 0 = the partition's default
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 24 * 60  # time limit, minutes
    constraint: str | None = None
    exclusive: bool = False
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: stop, save, requeue
    max_timeout_requeues: int = 20  # requeues after time limits (after preemption: unlimited)
    job_name: str = "pixelflow"
    extra_sbatch: dict[str, str] = field(default_factory=dict)  # more sbatch options, e.g. {reservation: x}
    setup: list[str] = field(default_factory=list)  # shell lines run before the tasks start (module load ...)

    def problem(self) -> tuple[str, str] | None:
        """This section's first impossible value as (key within the section, reason), or None."""
        return failed(
            [
                (self.nodes >= 1, "nodes", f"= {self.nodes} must be at least 1"),
                (self.tasks_per_node >= 1, "tasks_per_node", f"= {self.tasks_per_node} must be at least 1"),
                (self.gpus_per_node >= 0, "gpus_per_node", "must not be negative"),
                (self.cpus_per_task >= 1, "cpus_per_task", f"= {self.cpus_per_task} must be at least 1"),
                (self.mem_gb >= 0, "mem_gb", "must not be negative"),
                (self.time_min >= 1, "time_min", f"= {self.time_min} must be at least 1"),
                (self.signal_delay_s >= 0, "signal_delay_s", "must not be negative"),
                (self.max_timeout_requeues >= 0, "max_timeout_requeues", "must not be negative"),
            ]
        )


@dataclass
class Config:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "engine": ("fsdp", "deepspeed")
    }  # allowed values: checked, and named in errors
    run_dir: str = MISSING
    seed: int = 0
    resume: str = "auto"  # auto (newest committed checkpoint of run_dir) | none | a checkpoint or export path
    engine: str = "fsdp"  # fsdp (FSDP2/HSDP when distributed, plain on one process) | deepspeed (ZeRO-3)
    model: ModelConfig = field(default_factory=ModelConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    text: TextConfig = field(default_factory=TextConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def _explain(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "?"
    message = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    if type(exc).__name__ == "ConfigKeyError":
        return f"unknown key '{key}'"
    if type(exc).__name__ == "MissingMandatoryValue":
        return f"'{key}' is required but not set"
    return f"'{key}': {message}"


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, validate, and return the typed Config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        from_file = OmegaConf.load(path)
    except Exception as exc:  # yaml errors have many classes; all mean the same to the user
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if not OmegaConf.is_dict(from_file):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")

    cfg = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(cfg, renamed(from_file, str(path)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_explain(exc)}") from None
    overridden = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value")
        key = item.split("=", 1)[0].strip()
        overridden.add(RENAMED.get(key, key))
        try:
            cfg = OmegaConf.merge(cfg, renamed(OmegaConf.from_dotlist([item]), "command line override"))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command line override '{item}': {_explain(exc)}") from None
    config = _typed(cfg, str(path))
    problem = first_problem(config)
    if problem is not None:
        key, reason = problem
        source = "command line override" if key in overridden else str(path)
        raise ConfigError(redact(f"{source}: '{key}' {reason}", secrets_of(config)))
    return config


RENAMED = {"sample.cfg": "sample.guidance_scale"}  # old key -> new key: old configs and overrides still load


def renamed(conf, where: str | None):
    """conf with every old key of RENAMED moved to its new name (a warning naming `where`, unless None:
    configs saved inside checkpoints are read as they are); both names at once is an error."""
    for old, new in RENAMED.items():
        if OmegaConf.select(conf, old, default=None) is None:
            continue
        if OmegaConf.select(conf, new, default=None) is not None:
            raise ConfigError(f"{where or 'saved config'}: '{old}' and '{new}' are the same setting: give '{new}' only")
        parent, leaf = old.rsplit(".", 1)
        OmegaConf.update(conf, new, OmegaConf.select(conf, old), merge=False)
        OmegaConf.select(conf, parent).pop(leaf)
        if where is not None:
            log.warning("%s: '%s' is now '%s' (the old name is read for now)", where, old, new)
    return conf


def nonfinite_number(node, prefix: str = "") -> tuple[str, object] | None:
    """(key, value) of the first float in a config tree that is NaN or infinite (it would train NaN weights)."""
    for item in fields(node):
        value, key = getattr(node, item.name), f"{prefix}{item.name}"
        if is_dataclass(value):
            found = nonfinite_number(value, key + ".")
            if found:
                return found
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return key, value
    return None


def compile_enabled(cfg: Config, device_type: str) -> bool:
    """parallel.compile, or its default: compiled on CUDA where the path is known to compile (the fsdp
    engine without tensor parallel), eager elsewhere."""
    if cfg.parallel.compile is not None:
        return cfg.parallel.compile
    return device_type == "cuda" and cfg.engine == "fsdp" and cfg.parallel.tp == 1


def fused_qkv_enabled(cfg: Config, device_type: str) -> bool:
    """parallel.fused_qkv, or its default: on CUDA where the three layers are plain Linears whose weights
    the block holds whole (not under tensor parallel, FP8 or DeepSpeed's per-layer gathering)."""
    plain = cfg.engine == "fsdp" and cfg.parallel.tp == 1 and not cfg.parallel.float8
    return plain and (cfg.parallel.fused_qkv if cfg.parallel.fused_qkv is not None else device_type == "cuda")


def size_granule(cfg: Config) -> int:
    """What every image side must be a multiple of: patch_size x 2^(stages-1) (each cascade stage halves both
    sides, down to whole patches)."""
    return cfg.model.patch_size * 2 ** (cfg.cascade.stages - 1)


def micro_tokens(cfg: Config, resolution: int | None = None) -> int:
    """Tokens one rank may hold in a micro-batch (train.micro_tokens, else micro_batch full-resolution
    samples' worth, at `resolution`: default data.resolution); 0 = no limit."""
    if cfg.train.micro_tokens:
        return cfg.train.micro_tokens
    return cfg.train.micro_batch * ((resolution or cfg.data.resolution) // max(cfg.model.patch_size, 1)) ** 2


def spoken(values: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def choice_problem(node, prefix: str = "") -> tuple[str, str] | None:
    """(key, reason) of the first value outside its section's CHOICES, through every section."""
    for name, allowed in getattr(type(node), "CHOICES", {}).items():
        value = getattr(node, name)
        if value not in allowed:
            return f"{prefix}{name}", f"= '{value}' must be {spoken(allowed)}"
    for item in fields(node):
        value = getattr(node, item.name)
        if is_dataclass(value):
            found = choice_problem(value, f"{prefix}{item.name}.")
            if found:
                return found
    return None


def first_problem(cfg: Config) -> Problem | None:
    """The first impossible value in cfg as (key, reason), or None when the config can run: non-finite
    numbers, then CHOICES, then each section's own checks, then the checks that span sections."""
    nonfinite = nonfinite_number(cfg)
    if nonfinite is not None:
        return nonfinite[0], f"= {nonfinite[1]} must be a finite number"
    choice = choice_problem(cfg)
    if choice is not None:
        return choice
    for item in fields(cfg):
        section = getattr(cfg, item.name)
        check = getattr(section, "problem", None) if is_dataclass(section) else None
        found = check() if check is not None else None
        if found is not None:
            return f"{item.name}.{found[0]}", found[1]
    return across_sections(cfg)


def across_sections(cfg: Config) -> Problem | None:
    """Checks of values that only make sense together (and of the top-level keys)."""
    m, c, d, p = cfg.model, cfg.cascade, cfg.data, cfg.parallel
    granule = size_granule(cfg)
    largest = max(d.resolutions)
    top_tokens = (largest // max(m.patch_size, 1)) ** 2
    tokens = micro_tokens(cfg, largest)
    off_grid = [phase.resolution for phase in d.resolution_schedule if phase.resolution % granule]
    return failed(
        [
            (
                d.resolution % granule == 0 and d.resolution > 0,
                "data.resolution",
                f"= {d.resolution} must be a positive multiple of patch_size * 2^(stages-1) = {granule}",
            ),
            (
                not off_grid,
                "data.resolution_schedule",
                f"has resolution {(off_grid or [0])[0]}, not a multiple of patch_size * 2^(stages-1) = {granule}",
            ),
            (
                not tokens or tokens * p.sp >= top_tokens,
                "train.micro_tokens" if cfg.train.micro_tokens else "train.micro_batch",
                f"gives {tokens} tokens per micro-batch on each rank, less than one full-resolution sample "
                f"needs ({top_tokens} tokens over parallel.sp = {p.sp} ranks)",
            ),
            (
                cfg.plan.stage_weights is None or len(cfg.plan.stage_weights) == c.stages,
                "plan.stage_weights",
                f"= {cfg.plan.stage_weights} must be {c.stages} non-negative numbers (one per stage), not all 0",
            ),
            (
                m.num_heads % p.sp == 0,
                "parallel.sp",
                f"= {p.sp} must divide model.num_heads = {m.num_heads} (Ulysses splits heads)",
            ),
            (
                m.num_heads % (p.tp * p.sp) == 0,
                "parallel.tp",
                f"= {p.tp} x parallel.sp = {p.sp} must divide model.num_heads = {m.num_heads} "
                "(tensor parallel and Ulysses both split heads)",
            ),
            (
                cfg.engine != "deepspeed" or (p.sp == p.tp == p.dp_replicate == 1),
                "engine",
                "= deepspeed runs ZeRO-3 data parallel only (parallel.sp, tp and dp_replicate must be 1)",
            ),
            (
                cfg.engine != "deepspeed" or (not p.compile and p.activation_checkpointing == "none"),
                "engine",
                "= deepspeed runs its own module hooks: parallel.compile and parallel.activation_checkpointing are "
                "for the fsdp engine (leave them unset)",
            ),
            (
                not p.float8 or (cfg.engine == "fsdp" and p.tp == 1),
                "parallel.float8",
                "= true runs with the fsdp engine and parallel.tp = 1 (megatron-core's layers are not torchao's)",
            ),
            (
                cfg.sample.cfg_ramp is None or len(cfg.sample.cfg_ramp) == c.stages,
                "sample.cfg_ramp",
                f"must have one value per stage ({c.stages})",
            ),
            (not m.text_dim or len(cfg.sample.prompts) > 0, "sample.prompts", "must name at least one prompt"),
            (
                not (d.sources and cfg.text.embeddings),
                "text.embeddings",
                "names one dataset's embeddings: with data.sources give each source its own (sources.N.embeddings)",
            ),
            (bool(cfg.resume), "resume", "must be auto, none or a checkpoint path"),
            (bool(cfg.run_dir), "run_dir", "must name a directory"),
        ]
    )


# Values read from the environment (`${oc.env:...}`) are secrets until shown otherwise: they are written as
# their interpolation text and blanked out of every error line. Each config carries its own (`secrets_of`).
URL_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Text with URL passwords (scheme://user:pass@host) and the given secret values blanked out."""
    text = URL_CREDENTIALS.sub(r"\1***@", text)
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def secrets_of(cfg: Config) -> frozenset[str]:
    """The values cfg read from the environment."""
    return cfg.__dict__.get("_secrets", frozenset())


@contextmanager
def redacting(cfg: Config) -> Iterator[None]:
    """Run a command on cfg: an error raised inside names none of cfg's environment-derived values."""
    try:
        yield
    except Exception as exc:
        secrets = secrets_of(cfg)
        if secrets and len(exc.args) == 1 and isinstance(exc.args[0], str):
            exc.args = (redact(exc.args[0], secrets),)
        raise


def _env_interpolations(node, prefix: str = "") -> dict[str, str]:
    """{dotted key: interpolation text} of every value that reads the environment."""
    found = {}
    for key in range(len(node)) if OmegaConf.is_list(node) else node:  # lists too: data.sources' paths
        path = f"{prefix}{key}"
        if OmegaConf.is_interpolation(node, key):
            text = str(node._get_node(key)._value())
            if "oc.env" in text:
                found[path] = text
        elif OmegaConf.is_config(child := node._get_node(key)) and not (child._is_none() or child._is_missing()):
            found.update(_env_interpolations(node[key], path + "."))
    return found


def _typed(conf, where: str) -> Config:
    """The Config of a merged DictConfig; environment-derived values are remembered as such (an error
    about one, here or later under `redacting`, shows it blanked out)."""
    raw = _env_interpolations(conf)
    secrets = set()
    for text in raw.values():  # gathered before anything resolves them, so no error line can show them
        for name in re.findall(r"oc\.env:\s*([^,}\s]+)", text):
            value = os.environ.get(name.strip("'\""))
            if value is not None and len(value) >= 4:
                secrets.add(value)
    try:
        config: Config = OmegaConf.to_object(conf)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(redact(f"{where}: {_explain(exc)}", secrets)) from None
    config.__dict__["_env_interpolations"] = raw  # not fields: to_yaml writes these back unresolved
    config.__dict__["_secrets"] = frozenset(secrets)
    return config


def to_yaml(cfg: Config) -> str:
    """The config as YAML: values from the environment as their `${oc.env:...}` text, URL passwords blanked."""
    conf = OmegaConf.structured(cfg)
    for key, text in getattr(cfg, "_env_interpolations", {}).items():
        OmegaConf.update(conf, key, text, merge=False)
    return URL_CREDENTIALS.sub(r"\1***@", OmegaConf.to_yaml(conf))


def from_yaml(text: str, unset_env_ok: bool = False) -> Config:
    """Rebuild a Config saved with to_yaml (e.g. inside a checkpoint); `${oc.env:...}` values resolve here.
    unset_env_ok (sampling, export: they need the model, not the data) puts the schema's default, or
    "(unset)", where a variable is not set in this environment."""
    conf = OmegaConf.merge(OmegaConf.structured(Config), renamed(OmegaConf.create(text), None))
    if unset_env_ok:
        defaults = OmegaConf.structured(Config)
        for key in _env_interpolations(conf):
            try:
                OmegaConf.select(conf, key, throw_on_resolution_failure=True)
            except OmegaConfBaseException:
                default = OmegaConf.select(defaults, key, throw_on_missing=False)
                OmegaConf.update(conf, key, "(unset)" if default is None else default, merge=False)
    return _typed(conf, "saved config")
