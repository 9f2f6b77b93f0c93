"""Every collective a piece of code issues, with its kind, mesh dimension, dtype and bytes.

A dispatch mode sees both kinds torch issues: c10d's (FSDP's all-gathers and reductions, pipeline
send/receive, the trainer's own all-reduces) and the functional collectives of DTensor (tensor
parallelism). Under the fake process group nothing moves, so this is how one rank's traffic is measured.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# c10d op names (and functional ones) to the collective they are, and which tensor argument gives its size:
# the larger of input and output for gathers and scatters (what the ring moves, over the group).
KINDS = {
    "allreduce_": "all_reduce",
    "all_reduce": "all_reduce",
    "_allgather_base_": "all_gather",
    "allgather_": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "broadcast_": "broadcast",
    "broadcast": "broadcast",
    "send": "send",
    "recv_": "recv",
    "alltoall_base_": "all_to_all",
    "all_to_all_single": "all_to_all",
}


@dataclass(frozen=True)
class Collective:
    kind: str
    dim: str  # the mesh dimension whose group it ran over ("world" for the whole job)
    dtype: str
    bytes: int


class CollectiveRecorder(TorchDispatchMode):
    """Records collectives while active; `group_dims` names each process group by its mesh dimension."""

    def __init__(self, group_dims: dict[str, str]):
        super().__init__()
        self.group_dims = group_dims
        self.records: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if func.namespace in ("c10d", "_c10d_functional") and name in KINDS:
            leaves = tree_leaves((args, kwargs))
            tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            group = next(filter(None, map(self._group_name, leaves)), None)
            largest = max(tensors, key=lambda t: t.numel())
            self.records.append(
                Collective(
                    KINDS[name],
                    self.group_dims.get(group, "world"),
                    str(largest.dtype).removeprefix("torch."),
                    largest.numel() * largest.element_size(),
                )
            )
        return func(*args, **kwargs)

    @staticmethod
    def _group_name(x) -> str | None:
        if isinstance(x, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(x).group_name
            except RuntimeError:
                return None
        return x if isinstance(x, str) and x.isdigit() else None

    def summary(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(dim, kind, dtype) -> (count, bytes)."""
        counts, sizes = Counter(), Counter()
        for c in self.records:
            key = (c.dim, c.kind, c.dtype)
            counts[key] += 1
            sizes[key] += c.bytes
        return {key: (counts[key], sizes[key]) for key in counts}


def mesh_group_dims(mesh) -> dict[str, str]:
    """Each mesh dimension's process group name, to its dimension name."""
    return {mesh[dim].get_group().group_name: dim for dim in mesh.mesh_dim_names if mesh[dim].size() > 1}
