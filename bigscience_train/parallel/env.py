"""The process's place in the job: rank, world, device, and the (pp, dp, tp) DeviceMesh.

Launchers: plain `python` (one process), torchrun (RANK/WORLD_SIZE/LOCAL_RANK), or srun with one task per
rank (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR/MASTER_PORT set by the batch script).
Backend: NCCL when CUDA is present, gloo otherwise.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from bigscience_train.parallel.dims import ParallelDims


def launcher_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else srun's, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "MASTER_ADDR" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0")
        )
        return rank, world, int(os.environ["LOCAL_RANK"])
    return 0, 1, 0


@dataclass
class ParallelEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dims: ParallelDims
    mesh: DeviceMesh

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank()

    def dp_group(self):
        return self.mesh["dp"].get_group()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_max(self, values: list[float]) -> list[float]:
        """Element-wise max over every rank of the job: for decisions all ranks must take together (stop,
        skip), in one collective."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def all_gather_object(self, obj) -> list:
        """Small Python objects from every rank (file lists, error messages), in rank order."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def all_reduce_sum(self, t: torch.Tensor, dims: tuple[str, ...] = ("pp", "dp")) -> torch.Tensor:
        """Sums over the named mesh dimensions: per-stage and per-replica totals (losses, token counts)."""
        for dim in dims:
            if self.mesh[dim].size() > 1:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.mesh[dim].get_group())
        return t


def rank_device(local_rank: int) -> torch.device:
    """The GPU of this rank's place on its node (one rank per GPU, as NCCL needs), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: this node shows {gpus}"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            + f"; start one rank per GPU (torchrun --nproc_per_node {gpus}, "
            f"or cluster.procs_per_node={gpus}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU"
        )
    return torch.device("cuda", local_rank)


def job_dims(cfg) -> ParallelDims:
    """The layout a run config asks for on the job this process belongs to."""
    return ParallelDims.from_config(cfg, launcher_env()[1])


def init_parallel(dims: ParallelDims | None = None, timeout_minutes: float = 30.0) -> ParallelEnv:
    """Joins the job's process group and builds the mesh of `dims` (default: one process), whose sizes must
    multiply to the world size."""
    dims = dims or ParallelDims()
    rank, world, local_rank = launcher_env()
    if dims.world_size != world:
        raise ValueError(f"the layout {dims} needs {dims.world_size} processes; this job has {world}")
    device = rank_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        else:
            # A process group of one, so that one process runs the same code as many (megatron-core's
            # index builders and DCP ask for ranks too).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return ParallelEnv(rank, world, local_rank, device, dims, dims.build_mesh(device.type))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
