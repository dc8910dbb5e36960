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
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import ClassVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pixelflow.errors import ConfigError

log = logging.getLogger(__name__)


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


@dataclass
class CascadeConfig:
    stages: int = 4
    gamma: float = -1.0 / 3.0  # correlation of the 2x2 block noise used when moving up a stage
    num_train_timesteps: int = 1000


@dataclass
class DataConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "resize_filter": ("bicubic", "lanczos")
    }  # allowed values: checked, and named in errors
    path: str = MISSING  # directory (or s3://bucket/prefix) holding manifest.json and the shards
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


@dataclass
class PlanConfig:
    """How the planner shares each step's stages and work out (pixelflow/data/planner.py)."""

    stage_weights: list[float] | None = None  # share of each stage in the global batch; None = uniform
    # per-token cost that does not scale with d^2 or L^2 (norms, modulation, elementwise), in FLOP-equivalents
    # per token, channel and block; benchmarks/planner.py --calibrate measures it (this: a 2-core CPU)
    token_overhead: float = 5000.0


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


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep: int = 3  # newest committed checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this, for good; 0 = none
    async_save: bool | None = None  # write in the background after staging to host memory; None = on CUDA


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
    try:
        config = _typed(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_explain(exc)}") from None

    problem = first_problem(config)
    if problem is not None:
        key, reason = problem
        source = "command line override" if key in overridden else str(path)
        raise ConfigError(f"{source}: '{key}' {reason}")
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


# One set of sampling-option checks for the config (sample.*), `pixelflow sample` and `pixelflow eval`.
def steps_problem(steps: int) -> str | None:
    return None if steps >= 1 else "must be at least 1"


def guidance_problem(scale: float) -> str | None:
    return None if math.isfinite(scale) and scale >= 0 else "must be a finite number >= 0"


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


def micro_tokens(cfg: Config) -> int:
    """Tokens one rank may hold in a micro-batch (train.micro_tokens, else micro_batch full-resolution
    samples' worth); 0 = no limit."""
    if cfg.train.micro_tokens:
        return cfg.train.micro_tokens
    return cfg.train.micro_batch * (cfg.data.resolution // max(cfg.model.patch_size, 1)) ** 2


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


def first_problem(cfg: Config) -> tuple[str, str] | None:
    """The first impossible value in cfg as (key, reason), or None when the config can run."""
    nonfinite = nonfinite_number(cfg)
    if nonfinite is not None:
        return nonfinite[0], f"= {nonfinite[1]} must be a finite number"
    choice = choice_problem(cfg)
    if choice is not None:
        return choice
    m, c, d, t = cfg.model, cfg.cascade, cfg.data, cfg.train
    granule = m.patch_size * 2 ** (c.stages - 1)
    top_tokens = (d.resolution // max(m.patch_size, 1)) ** 2
    sample_steps, guidance = steps_problem(cfg.sample.steps_per_stage), guidance_problem(cfg.sample.guidance_scale)
    checks: list[tuple[bool, str, str]] = [
        (c.stages >= 1, "cascade.stages", f"= {c.stages} must be at least 1"),
        (m.patch_size >= 1, "model.patch_size", f"= {m.patch_size} must be at least 1"),
        (
            d.resolution % granule == 0 and d.resolution > 0,
            "data.resolution",
            f"= {d.resolution} must be a positive multiple of patch_size * 2^(stages-1) = {granule}",
        ),
        (m.depth >= 1, "model.depth", f"= {m.depth} must be at least 1"),
        (m.num_heads >= 1, "model.num_heads", f"= {m.num_heads} must be at least 1"),
        (
            m.head_dim % 4 == 0 and m.head_dim > 0,
            "model.head_dim",
            f"= {m.head_dim} must be a positive multiple of 4 (2D RoPE)",
        ),
        (m.num_classes >= 0, "model.num_classes", f"= {m.num_classes} must not be negative"),
        (0.0 <= m.class_dropout < 1.0, "model.class_dropout", f"= {m.class_dropout} must be in [0, 1)"),
        (m.mlp_ratio > 0, "model.mlp_ratio", f"= {m.mlp_ratio} must be positive"),
        (m.text_dim is None or m.text_dim > 0, "model.text_dim", f"= {m.text_dim} must be positive or null"),
        (c.gamma < 0, "cascade.gamma", f"= {c.gamma} must be negative (block-noise correlation)"),
        (c.num_train_timesteps >= c.stages, "cascade.num_train_timesteps", "must be at least cascade.stages"),
        (d.num_workers >= 0, "data.num_workers", f"= {d.num_workers} must not be negative"),
        (d.shuffle_block >= 1, "data.shuffle_block", f"= {d.shuffle_block} must be at least 1"),
        (d.lanes >= 0, "data.lanes", f"= {d.lanes} must not be negative"),
        (d.retries >= 1, "data.retries", f"= {d.retries} must be at least 1"),
        (d.retry_wait >= 0, "data.retry_wait", f"= {d.retry_wait} must not be negative"),
        (d.max_pixels >= d.resolution**2, "data.max_pixels", f"= {d.max_pixels} must be at least resolution^2"),
        (0 <= d.max_bad_fraction < 1, "data.max_bad_fraction", f"= {d.max_bad_fraction} must be in [0, 1)"),
        (1.0 <= d.expand_ratio <= 4.0, "data.expand_ratio", f"= {d.expand_ratio} must be in [1, 4]"),
        (cfg.text.max_tokens >= 1, "text.max_tokens", f"= {cfg.text.max_tokens} must be at least 1"),
        (0.0 <= cfg.text.dropout < 1.0, "text.dropout", f"= {cfg.text.dropout} must be in [0, 1)"),
        (bool(d.path), "data.path", "must name a dataset directory or s3:// prefix"),
        (t.steps >= 1, "train.steps", f"= {t.steps} must be at least 1"),
        (t.global_batch >= 1, "train.global_batch", f"= {t.global_batch} must be at least 1"),
        (t.micro_batch >= 0, "train.micro_batch", f"= {t.micro_batch} must not be negative"),
        (t.peak_tflops >= 0, "train.peak_tflops", f"= {t.peak_tflops} must not be negative"),
        (t.collective_timeout_s > 0, "train.collective_timeout_s", f"= {t.collective_timeout_s} must be positive"),
        (t.micro_tokens >= 0, "train.micro_tokens", f"= {t.micro_tokens} must not be negative"),
        (
            not micro_tokens(cfg) or micro_tokens(cfg) * cfg.parallel.sp >= top_tokens,
            "train.micro_tokens" if t.micro_tokens else "train.micro_batch",
            f"gives {micro_tokens(cfg)} tokens per micro-batch on each rank, less than one full-resolution sample "
            f"needs ({top_tokens} tokens over parallel.sp = {cfg.parallel.sp} ranks)",
        ),
        (
            cfg.plan.stage_weights is None
            or (
                len(cfg.plan.stage_weights) == c.stages
                and min(cfg.plan.stage_weights) >= 0
                and sum(cfg.plan.stage_weights) > 0
            ),
            "plan.stage_weights",
            f"= {cfg.plan.stage_weights} must be {c.stages} non-negative numbers (one per stage), not all 0",
        ),
        (cfg.plan.token_overhead >= 0, "plan.token_overhead", f"= {cfg.plan.token_overhead} must not be negative"),
        (t.lr > 0, "train.lr", f"= {t.lr} must be positive"),
        (t.weight_decay >= 0, "train.weight_decay", f"= {t.weight_decay} must not be negative"),
        (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "must be two numbers in [0, 1)"),
        (t.warmup_steps >= 0, "train.warmup_steps", f"= {t.warmup_steps} must not be negative"),
        (0 <= t.min_lr <= t.lr, "train.min_lr", f"= {t.min_lr} must be in [0, train.lr]"),
        (t.grad_clip > 0, "train.grad_clip", f"= {t.grad_clip} must be positive"),
        (0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"= {t.ema_decay} must be in [0, 1)"),
        (t.log_every >= 1, "train.log_every", f"= {t.log_every} must be at least 1"),
        (cfg.parallel.dp_replicate >= 1, "parallel.dp_replicate", "must be at least 1"),
        (cfg.parallel.dp_shard >= 0, "parallel.dp_shard", "must be 0 (all remaining ranks) or more"),
        (cfg.parallel.sp >= 1, "parallel.sp", "must be at least 1"),
        (
            m.num_heads % cfg.parallel.sp == 0,
            "parallel.sp",
            f"= {cfg.parallel.sp} must divide model.num_heads = {m.num_heads} (Ulysses splits heads)",
        ),
        (cfg.parallel.tp >= 1, "parallel.tp", "must be at least 1"),
        (
            m.num_heads % (cfg.parallel.tp * cfg.parallel.sp) == 0,
            "parallel.tp",
            f"= {cfg.parallel.tp} x parallel.sp = {cfg.parallel.sp} must divide model.num_heads = {m.num_heads} "
            "(tensor parallel and Ulysses both split heads)",
        ),
        (
            cfg.engine != "deepspeed" or (cfg.parallel.sp == cfg.parallel.tp == cfg.parallel.dp_replicate == 1),
            "engine",
            "= deepspeed runs ZeRO-3 data parallel only (parallel.sp, tp and dp_replicate must be 1)",
        ),
        (
            cfg.engine != "deepspeed" or (not cfg.parallel.compile and cfg.parallel.activation_checkpointing == "none"),
            "engine",
            "= deepspeed runs its own module hooks: parallel.compile and parallel.activation_checkpointing are "
            "for the fsdp engine (leave them unset)",
        ),
        (
            not cfg.parallel.float8 or (cfg.engine == "fsdp" and cfg.parallel.tp == 1),
            "parallel.float8",
            "= true runs with the fsdp engine and parallel.tp = 1 (megatron-core's layers are not torchao's)",
        ),
        (
            re.fullmatch(r"none|full|every_[1-9]\d*", cfg.parallel.activation_checkpointing) is not None,
            "parallel.activation_checkpointing",
            f"= '{cfg.parallel.activation_checkpointing}' must be none, full or every_<k>",
        ),
        (cfg.checkpoint.every >= 1, "checkpoint.every", f"= {cfg.checkpoint.every} must be at least 1"),
        (cfg.checkpoint.keep >= 1, "checkpoint.keep", f"= {cfg.checkpoint.keep} must be at least 1"),
        (
            cfg.checkpoint.keep_every >= 0,
            "checkpoint.keep_every",
            f"= {cfg.checkpoint.keep_every} must not be negative",
        ),
        (bool(cfg.resume), "resume", "must be auto, none or a checkpoint path"),
        (
            all(
                name.startswith("SIG")
                and isinstance(getattr(signal, name, None), signal.Signals)
                and name not in ("SIGKILL", "SIGSTOP")
                for name in t.stop_signals
            ),
            "train.stop_signals",
            f"= {list(t.stop_signals)} must name catchable signals, e.g. [SIGTERM, SIGUSR2]",
        ),
        (not sample_steps, "sample.steps_per_stage", f"= {cfg.sample.steps_per_stage} {sample_steps}"),
        (not guidance, "sample.guidance_scale", f"= {cfg.sample.guidance_scale} {guidance}"),
        (
            cfg.sample.cfg_ramp is None or len(cfg.sample.cfg_ramp) == c.stages,
            "sample.cfg_ramp",
            f"must have one value per stage ({c.stages})",
        ),
        (cfg.sample.shift > 0, "sample.shift", f"= {cfg.sample.shift} must be positive"),
        (cfg.sample.every >= 0, "sample.every", f"= {cfg.sample.every} must not be negative"),
        (cfg.sample.count >= 1, "sample.count", f"= {cfg.sample.count} must be at least 1"),
        (not m.text_dim or len(cfg.sample.prompts) > 0, "sample.prompts", "must name at least one prompt"),
        (bool(cfg.run_dir), "run_dir", "must name a directory"),
        (cfg.slurm.nodes >= 1, "slurm.nodes", f"= {cfg.slurm.nodes} must be at least 1"),
        (cfg.slurm.tasks_per_node >= 1, "slurm.tasks_per_node", f"= {cfg.slurm.tasks_per_node} must be at least 1"),
        (cfg.slurm.gpus_per_node >= 0, "slurm.gpus_per_node", "must not be negative"),
        (cfg.slurm.cpus_per_task >= 1, "slurm.cpus_per_task", f"= {cfg.slurm.cpus_per_task} must be at least 1"),
        (cfg.slurm.mem_gb >= 0, "slurm.mem_gb", "must not be negative"),
        (cfg.slurm.time_min >= 1, "slurm.time_min", f"= {cfg.slurm.time_min} must be at least 1"),
        (cfg.slurm.signal_delay_s >= 0, "slurm.signal_delay_s", "must not be negative"),
        (cfg.slurm.max_timeout_requeues >= 0, "slurm.max_timeout_requeues", "must not be negative"),
    ]
    for ok, key, reason in checks:
        if not ok:
            return key, reason
    return None


# Values read from the environment (`${oc.env:...}`) are secrets until shown otherwise: they are written as
# their interpolation text and blanked out of every line the CLIs print.
SECRET_VALUES: set[str] = set()
URL_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")


def redact(text: str) -> str:
    """Text with URL passwords (scheme://user:pass@host) and environment-derived values blanked out."""
    text = URL_CREDENTIALS.sub(r"\1***@", text)
    for value in sorted(SECRET_VALUES, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def _env_interpolations(node, prefix: str = "") -> dict[str, str]:
    """{dotted key: interpolation text} of every value that reads the environment."""
    found = {}
    for key in node:
        path = f"{prefix}{key}"
        if OmegaConf.is_interpolation(node, key):
            text = str(node._get_node(key)._value())
            if "oc.env" in text:
                found[path] = text
        elif OmegaConf.is_dict(node._get_node(key)):
            found.update(_env_interpolations(node[key], path + "."))
    return found


def _typed(conf) -> Config:
    """The Config of a merged DictConfig; environment-derived values are remembered as such."""
    raw = _env_interpolations(conf)
    for text in raw.values():  # registered before anything resolves them, so no error line can show them
        for name in re.findall(r"oc\.env:\s*([^,}\s]+)", text):
            value = os.environ.get(name.strip("'\""))
            if value is not None and len(value) >= 4:
                SECRET_VALUES.add(value)
    config: Config = OmegaConf.to_object(conf)
    config.__dict__["_env_interpolations"] = raw  # not a field: to_yaml writes these back unresolved
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
    try:
        return _typed(conf)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"saved config: {_explain(exc)}") from None
