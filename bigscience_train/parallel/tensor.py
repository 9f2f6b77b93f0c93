"""Tensor parallelism: a DTensor plan applied to a built GPT from outside (Megatron's layout).

Attention and MLP: the fused QKV and h->4h projections are column-parallel (whole heads per rank, since
BLOOM's QKV layout keeps each head's q, k, v together), the output projections row-parallel (one all-reduce
each). The word embedding is vocab-parallel and the tied output layer produces vocab-sharded logits that the
loss consumes under `loss_parallel`, so no rank holds full logits. ALiBi slopes are sliced to the rank's heads.
Parameters left replicated (layernorms) get their gradients averaged over the TP group, so they cannot drift
apart across ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)

from bigscience_train.model.gpt import GPT


def block_plan() -> dict:
    return {
        "self_attention.query_key_value": ColwiseParallel(),
        "self_attention.dense": RowwiseParallel(),
        "mlp.dense_h_to_4h": ColwiseParallel(),
        "mlp.dense_4h_to_h": RowwiseParallel(),
    }


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh) -> None:
    tp = tp_mesh.size()
    for block in model.transformer.h.values():
        parallelize_module(block, tp_mesh, block_plan())
    parallelize_module(
        model,
        tp_mesh,
        {
            "transformer.word_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        },
    )
    if model.shape.tie_embeddings:
        # Distributing each module made its own Parameter: tie them again, so one gradient accumulates.
        model.lm_head.weight = model.transformer.word_embeddings.weight
    heads = model.shape.num_heads // tp
    rank = tp_mesh.get_local_rank()
    model.register_buffer(
        "alibi_slopes", model.alibi_slopes[rank * heads : (rank + 1) * heads].clone(), persistent=False
    )


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def loss_context(tp: int):
    """Vocab-sharded logits need loss_parallel around both the loss and its backward."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def replicated_over_tp(t: torch.Tensor) -> bool:
    """A plain tensor, or a DTensor whose mesh has no tp dimension (e.g. sharded by FSDP over dp only)."""
    return not isinstance(t, DTensor) or "tp" not in (t.device_mesh.mesh_dim_names or ())


def average_replicated_grads(params: list[torch.nn.Parameter], tp_mesh: DeviceMesh) -> None:
    """Layernorm and other parameters the TP plan leaves whole: one averaged gradient on every TP rank,
    so they cannot drift apart."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None and replicated_over_tp(p.grad)]
    if grads and tp_mesh.size() > 1:
        all_reduce_mean(grads, tp_mesh.get_group(), tp_mesh.size())


def all_reduce_mean(tensors: list[torch.Tensor], group, size: int) -> None:
    """Averages tensors over a group with one collective (gloo has no AVG: sum, then divide)."""
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """torch's clip_grad_norm_ over any mix of plain and DTensor gradients (TP, FSDP, both): each parameter is
    counted once, a sharded gradient's norm assembled over the mesh dimensions it is sharded on.
    max_norm <= 0: measure only."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [local_tensor(g) for g in grads]
    norms = [torch.linalg.vector_norm(t) for t in local]
    by_groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        if isinstance(g, DTensor):
            # Any split of the tensor counts: FSDP over a TP-sharded dim uses _StridedShard, not Shard.
            dims = tuple(d for d, pl in enumerate(g.placements) if not (pl.is_replicate() or pl.is_partial()))
            if dims:
                by_groups.setdefault(tuple(g.device_mesh.get_group(d) for d in dims), []).append(i)
    for groups, members in by_groups.items():
        squares = torch.stack([norms[i] for i in members]) ** 2
        for group in groups:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
        for i, value in zip(members, squares.sqrt(), strict=True):
            norms[i] = value
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(local, coef)
    return total.item()
