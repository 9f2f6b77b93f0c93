"""Data parallelism over the mesh's dp dimension with FSDP2, for every layout (composable with TP and PP).

Each block is one unit and the root (embedding, final layernorm, output layer) another, so gradients are
reduced unit by unit during backward, overlapping the rest of it, in `reduce_dtype`. With bf16 or fp16
training the units compute in that dtype (MixedPrecisionPolicy) from fp32 parameters, which are then the
fp32 master weights, and sharded parameters are gathered in the training dtype.

none: replicas (`replicate`): whole parameters, gradients all-reduced once per step.
zero1: parameters and gradients whole through a step's micro-batches, then one reduce-scatter of the
gradients; between steps parameters are sharded, so the fp32 masters and AdamW's moments are sharded
(DeepSpeed's stage 1 with the same traffic: reduce-scatter plus all-gather, as Megatron's distributed
optimizer). zero2: gradients reduce-scattered after each micro-batch, so only shards accumulate. zero3:
parameters also freed after each unit's forward and gathered again for backward.

Through a pipeline every unit runs like zero1: whole gradients accumulate over the stage's micro-batches,
and each unit's are reduced during the stage's last backward (parallel/pipeline.py).
"""

from __future__ import annotations

from functools import partial

from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from bigscience_train.model.gpt import GPT
from bigscience_train.parallel.precision import TORCH_DTYPES


def apply_data_parallel(model: GPT, dp_mesh: DeviceMesh, zero: str, dtype: str, reduce_dtype: str) -> None:
    policy = MixedPrecisionPolicy(
        param_dtype=None if dtype == "fp32" else TORCH_DTYPES[dtype], reduce_dtype=TORCH_DTYPES[reduce_dtype]
    )
    if zero == "none":
        wrap = partial(replicate, mesh=dp_mesh, mp_policy=policy)
    else:
        wrap = partial(fully_shard, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=zero == "zero3")
    for block in model.transformer.h.values():
        wrap(block)
    wrap(model)


def sync_micro_batch(model: FSDPModule, zero: str, last: bool) -> None:
    """Before each micro-batch of a step: whether its backward reduces the gradients, and whether the
    parameters it gathered are freed after it."""
    accumulate_whole = zero in ("none", "zero1")
    model.set_requires_gradient_sync(last or not accumulate_whole)
    model.set_reshard_after_backward(last or zero == "zero3")
