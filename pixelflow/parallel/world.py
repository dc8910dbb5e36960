"""The process world: rank, device, and the one device mesh dp_replicate x dp_shard x sp x tp.

Set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or SLURM's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with MASTER_ADDR/PORT exported by the launcher). One process
without either is a world of one, with no process group.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pixelflow.config import Config, ParallelConfig, TrainConfig
from pixelflow.devices import flush_denormals
from pixelflow.errors import ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard", "sp", "tp")
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the one device mesh dp_replicate x dp_shard x sp x tp, and the named views
    every group is taken from (as torchtitan's ParallelDims):

    - `dp`: dp_replicate x dp_shard, the ranks that read different data;
    - `fsdp`: where parameters are sharded: dp_shard x sp (an SP group holds one copy of the model, as
      torchtitan shards over context parallel), with dp_replicate as the replica dimension of HSDP;
    - `sp`: the Ulysses group that shares one packed micro-batch; `tp`: the tensor-parallel group.
    """

    rank: int
    size: int
    device: torch.device
    mesh: DeviceMesh | None = None  # None for a single process
    views: dict[str, DeviceMesh] = field(default_factory=dict)  # dp, fsdp, sp, tp: see build_mesh
    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1
    tp: int = 1
    control: dist.ProcessGroup | None = None  # gloo, for the host's small agreements (errors, stop signals)
    timeout: datetime.timedelta = datetime.timedelta(minutes=30)  # of every collective (train.collective_timeout_s)

    def group(self) -> dist.ProcessGroup:
        """A new gloo group of every rank (for a thread of its own, e.g. background saves) with the world's
        timeout (collective: every rank makes the same groups in the same order)."""
        return gloo_group(self.timeout)

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a world of one)."""
        if self.distributed:
            dist.barrier()

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def gradient_ranks(self) -> int:
        """Ranks whose gradients FSDP averages (tensor-parallel ranks hold different parameters)."""
        return self.size // self.tp

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        return self.views.get("dp")

    @property
    def fsdp_mesh(self) -> DeviceMesh | None:
        return self.views.get("fsdp")

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0

    @property
    def sp_rank(self) -> int:
        return self.views["sp"].get_local_rank() if self.mesh is not None else 0

    @property
    def sp_group(self):
        return self.views["sp"].get_group() if self.mesh is not None else None

    @property
    def tp_rank(self) -> int:
        return self.views["tp"].get_local_rank() if self.mesh is not None else 0

    @property
    def tp_group(self):
        return self.views["tp"].get_group() if self.mesh is not None else None


def build_mesh(device_type: str, replicate: int, shard: int, sp: int, tp: int) -> tuple[DeviceMesh, dict]:
    """The one mesh and its named views. Flattened views are kept as made (torch no longer wants them
    sliced back out of the root); the HSDP view unflattens dp_replicate x (dp_shard x sp) from one."""
    mesh = init_device_mesh(device_type, (replicate, shard, sp, tp), mesh_dim_names=MESH_DIMS)
    parameters = mesh["dp_replicate", "dp_shard", "sp"]._flatten("dp_replicate_shard_sp")
    parameters = parameters._unflatten(0, (replicate, shard * sp), ("dp_replicate", "dp_shard_sp"))
    views = {
        "dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
        "fsdp": parameters if replicate > 1 else parameters["dp_shard_sp"],
        "sp": mesh["sp"],
        "tp": mesh["tp"],
    }
    return mesh, views


def _environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0


def layout_for(p: ParallelConfig, size: int) -> tuple[int, int, int, int]:
    """(dp_replicate, dp_shard, sp, tp) for a world size; dp_shard 0 takes all the remaining ranks."""
    replicate, shard, sp, tp = p.dp_replicate, p.dp_shard, p.sp, p.tp
    if shard == 0:
        shard = size // (replicate * sp * tp)
    if replicate * shard * sp * tp != size:
        raise ConfigError(
            f"parallel.dp_replicate x dp_shard x sp x tp = {replicate} x {shard or '?'} x {sp} x {tp} does not "
            f"match the {size} processes started"
        )
    return replicate, shard, sp, tp


def resolve_device(name: str, index: int = 0) -> torch.device:
    """auto | cpu | cuda -> a device (CUDA device `index` for cuda)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is visible")
    return torch.device("cuda", index) if name == "cuda" else torch.device(name)


def init_world(cfg: Config, device_name: str = "auto") -> World:
    """The training world: cfg's layout, device and collective timeout."""
    return join_world(cfg.parallel, device_name=device_name, timeout_s=cfg.train.collective_timeout_s)


def join_world(
    parallel: ParallelConfig, *, device_name: str = "auto", timeout_s: float = TrainConfig.collective_timeout_s
) -> World:
    """Join the process group (when launched as several processes) and build the device mesh: training's,
    and the samplers' (a ParallelConfig() of data ranks only)."""
    rank, size, local_rank = _environment()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 1
    device = resolve_device(device_name, local_rank % max(gpus, 1))  # more ranks than GPUs share them (gloo)
    use_cuda = device.type == "cuda"
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    flush_denormals()
    if use_cuda:
        torch.cuda.set_device(device)
    layout = layout_for(parallel, size)
    timeout = datetime.timedelta(seconds=timeout_s)
    if size == 1 and "RANK" not in os.environ:
        return World(0, 1, device, None, timeout=timeout)
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=size,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
    mesh, views = build_mesh(device.type, *layout)
    control = gloo_group(timeout)
    return World(rank, size, device, mesh, views, *layout, control=control, timeout=timeout)


def gloo_group(timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A new gloo group of every rank (collective)."""
    group = dist.new_group(backend="gloo", timeout=timeout)
    assert isinstance(group, dist.ProcessGroup)  # every rank is a member
    return group


def from_main(world: World, action: Callable[[], T]) -> T:
    """action() on rank 0, and its result, or the exception it raised, on every rank (collective): a check
    made once, whose one-line error every rank reports."""
    answer: list = [None, None]
    if world.is_main:
        try:
            answer[0] = action()
        except Exception as exc:  # handed to every rank, then raised everywhere
            answer[1] = exc
    if world.distributed:
        dist.broadcast_object_list(answer, src=0, group=world.control)
    if answer[1] is not None:
        raise answer[1]
    return answer[0]


def shutdown(world: World, together: bool = True) -> None:
    """Leave the process group. Together (after a barrier), no rank tears its connections down while another
    still talks; after a failure the others may never reach the barrier, so leave at once."""
    if world.distributed and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
