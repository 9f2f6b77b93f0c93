"""One process as any rank of a job of any size, through torch's fake process group.

Collectives return at once without moving data, so the code runs exactly the branches and shapes rank r
runs, with the real DeviceMesh: for memory, communication counts and build checks, never for values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Registers the "fake" backend.
from torch.testing._internal.distributed.fake_pg import FakeStore

from bigscience_train.parallel.dims import ParallelDims
from bigscience_train.parallel.env import ParallelEnv


def init_fake_rank(dims: ParallelDims, rank: int, device: str = "cpu") -> ParallelEnv:
    """Joins a fake process group as `rank` of `dims.world_size` ranks and builds the job's mesh."""
    if not 0 <= rank < dims.world_size:
        raise ValueError(f"rank {rank} is not in the layout {dims} of {dims.world_size} ranks")
    dist.init_process_group("fake", rank=rank, world_size=dims.world_size, store=FakeStore())
    torch_device = torch.device(device)
    return ParallelEnv(rank, dims.world_size, 0, torch_device, dims, dims.build_mesh(torch_device.type))
