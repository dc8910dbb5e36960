"""The process world: rank, device, and the device mesh dp_replicate x dp_shard x sp.

Set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or SLURM's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with MASTER_ADDR/PORT exported by the launcher). One process
without either is a world of one, with no process group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pixelflow.config import Config, ConfigError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device
    mesh: DeviceMesh | None = None  # dims dp_replicate, dp_shard, sp; None for a single process
    dp_mesh: DeviceMesh | None = None  # dp_replicate x dp_shard flattened: ranks that read different data
    fsdp_mesh: DeviceMesh | None = None  # where parameters live: (dp_replicate,) dp_shard x sp
    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1

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
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0

    @property
    def sp_rank(self) -> int:
        return self.mesh["sp"].get_local_rank() if self.mesh is not None else 0

    @property
    def sp_group(self):
        return self.mesh["sp"].get_group() if self.mesh is not None else None


def _environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0


def layout_for(cfg: Config, size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, sp) for a world size; dp_shard 0 takes all the remaining ranks."""
    replicate, shard, sp = cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.sp
    if shard == 0:
        shard = size // (replicate * sp)
    if replicate * shard * sp != size:
        raise ConfigError(
            f"parallel.dp_replicate x dp_shard x sp = {replicate} x {shard or '?'} x {sp} does not match the "
            f"{size} processes started"
        )
    return replicate, shard, sp


def resolve_device(name: str, index: int = 0) -> torch.device:
    """auto | cpu | cuda -> a device (CUDA device `index` for cuda)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is visible")
    return torch.device("cuda", index) if name == "cuda" else torch.device(name)


def init_world(cfg: Config, device_name: str = "auto") -> World:
    """Join the process group (when launched as several processes) and build the device mesh."""
    rank, size, local_rank = _environment()
    device = resolve_device(device_name, local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    replicate, shard, sp = layout_for(cfg, size)
    if size == 1 and "RANK" not in os.environ:
        return World(0, 1, device, None)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if use_cuda else None,
        )
    mesh = init_device_mesh(device.type, (replicate, shard, sp), mesh_dim_names=("dp_replicate", "dp_shard", "sp"))
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    # parameters are sharded over dp_shard x sp (as torchtitan does with context parallel), replicated over
    # dp_replicate (HSDP); rank order matches the 3-D mesh
    if replicate > 1:
        fsdp_mesh = init_device_mesh(
            device.type, (replicate, shard * sp), mesh_dim_names=("dp_replicate", "dp_shard_sp")
        )
    else:
        fsdp_mesh = mesh["dp_shard", "sp"]._flatten("dp_shard_sp")
    return World(rank, size, device, mesh, dp_mesh, fsdp_mesh, replicate, shard, sp)


def shutdown(world: World, together: bool = True) -> None:
    """Leave the process group. Together (after a barrier), no rank tears its connections down while another
    still talks; after a failure the others may never reach the barrier, so leave at once."""
    if world.distributed and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
