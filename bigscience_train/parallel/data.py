"""Sharded data parallelism with FSDP2 (`fully_shard`) over the mesh's dp dimension, composable with TP.

zero3: parameters, gradients and optimizer state sharded; parameters re-gathered for backward.
zero2: the same, but parameters stay gathered from forward to backward (reshard_after_forward=False), which
trades memory for one all-gather less per step. Gradients are reduce-scattered (averaged) over dp.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from bigscience_train.model.gpt import GPT


def apply_fsdp(model: GPT, dp_mesh: DeviceMesh, zero: str) -> None:
    reshard_after_forward = zero == "zero3"
    for block in model.transformer.h.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    # The root unit holds the (tied) embedding, the final layernorm and the output layer.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
