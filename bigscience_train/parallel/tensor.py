"""Tensor parallelism: a DTensor plan applied to a built GPT from outside (Megatron's layout).

Attention and MLP: the fused QKV and h->4h projections are column-parallel (whole heads per rank, since
BLOOM's QKV layout keeps each head's q, k, v together), the output projections row-parallel (one all-reduce
each). The word embedding is vocab-parallel and the tied output layer produces vocab-sharded logits that the
loss consumes under `loss_parallel`, so no rank holds full logits. ALiBi slopes are sliced to the rank's heads.
Parameters left replicated (layernorms) get their gradients averaged over the TP group, so they cannot drift
apart across ranks.

Sequence parallel (Megatron's): between the matmuls, in the layernorm, dropout and residual regions, each
rank holds a slice of the sequence instead of all of it; the row-parallel all-reduces become reduce-scatters
and the column-parallel inputs all-gathers. The layernorms' weights stay replicated DTensors; their gradients,
partial sums over each rank's slice, are summed over the TP group (align_grads_with_params).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from bigscience_train.model.gpt import GPT


def block_plan(sequence_parallel: bool) -> dict:
    matmuls = {
        "self_attention.query_key_value": ColwiseParallel(),
        "mlp.dense_h_to_4h": ColwiseParallel(),
    }
    if not sequence_parallel:
        return {
            **matmuls,
            "self_attention.dense": RowwiseParallel(),
            "mlp.dense_4h_to_h": RowwiseParallel(),
        }
    gather = {"input_layouts": (Shard(1),), "desired_input_layouts": (Replicate(),), "use_local_output": True}
    return {
        **matmuls,
        "input_layernorm": SequenceParallel(),
        # Attention takes (x, alibi bias, rotary terms): only x is split along the sequence.
        "self_attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None),
            desired_input_layouts=(Replicate(), None, None),
            use_local_output=True,
        ),
        "self_attention.dense": RowwiseParallel(output_layouts=Shard(1)),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(**gather),
        "mlp.dense_4h_to_h": RowwiseParallel(output_layouts=Shard(1)),
    }


class VocabParallelEmbedding(ParallelStyle):
    """Megatron's vocab-parallel embedding: each rank holds a slice of the vocabulary's rows, looks up the tokens
    that fall in it (zeros for the others) and the slices' outputs are summed over the group. DTensor's
    row-wise embedding computes the same forward, but torch has no row-wise rule for the embedding's backward:
    every rank then computes the weight gradient of the whole vocabulary before keeping its slice (t times the
    memory: 7 GB in bf16 for BLOOM's embedding). Here the backward is the local lookup's, on the slice."""

    def __init__(self, output_layout: Placement):
        super().__init__()
        self.output_layout = output_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.weight = nn.Parameter(distribute_tensor(module.weight, device_mesh, [Shard(0)]))
        layout = self.output_layout

        def forward(tokens: torch.Tensor) -> torch.Tensor:
            weight, start = local_part(module.weight)
            rows = weight.shape[0]
            outside = (tokens < start[0]) | (tokens >= start[0] + rows)
            out = F.embedding((tokens - start[0]).masked_fill(outside, 0), weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0)
            return (
                DTensor.from_local(out, device_mesh, [Partial()])
                .redistribute(device_mesh, [layout])
                .to_local()
            )

        module.forward = forward
        return module


def model_plan(model: GPT, sequence_parallel: bool) -> dict:
    """The parts outside the blocks that this model (or pipeline stage) holds."""
    t, plan = model.transformer, {}
    hidden = Shard(1) if sequence_parallel else Replicate()
    if t.word_embeddings is not None:
        plan["transformer.word_embeddings"] = VocabParallelEmbedding(hidden)
        if sequence_parallel and model.shape.embedding_layernorm:
            plan["transformer.word_embeddings_layernorm"] = SequenceParallel(use_local_output=True)
    if model.lm_head is not None:
        if sequence_parallel:
            plan["transformer.ln_f"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(
            input_layouts=hidden, output_layouts=Shard(-1), use_local_output=False
        )
    return plan


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    tp = tp_mesh.size()
    for block in model.transformer.h.values():
        parallelize_module(block, tp_mesh, block_plan(sequence_parallel))
    parallelize_module(model, tp_mesh, model_plan(model, sequence_parallel))
    if sequence_parallel:
        model.sequence_shards = tp
    # Distributing each module made its own Parameter: tie them again, so one gradient accumulates.
    model._tie_embeddings()
    heads = model.shape.num_heads // tp
    rank = tp_mesh.get_local_rank()
    model.hold_heads(range(rank * heads, (rank + 1) * heads))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_part(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The part of a parameter this rank holds, and its offset in the whole one (model/init.py)."""
    if not isinstance(param, DTensor):
        return param, (0,) * param.ndim
    # Index arithmetic on the mesh's coordinates: done on real tensors, also under a dry run's FakeTensorMode.
    with unset_fake_temporarily():
        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), tuple(offset)


def loss_context(vocab_parallel: bool):
    """Vocab-sharded logits need loss_parallel around both the loss and its backward."""
    return loss_parallel() if vocab_parallel else contextlib.nullcontext()


def replicated_over_tp(t: torch.Tensor) -> bool:
    """A plain tensor, or a DTensor whose mesh has no tp dimension (e.g. sharded by FSDP over dp only)."""
    return not isinstance(t, DTensor) or "tp" not in (t.device_mesh.mesh_dim_names or ())


def average_replicated_grads(params: list[torch.nn.Parameter], tp_mesh: DeviceMesh) -> None:
    """Layernorm and other parameters the TP plan leaves whole: one averaged gradient on every TP rank,
    so they cannot drift apart."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None and replicated_over_tp(p.grad)]
    if grads and tp_mesh.size() > 1:
        all_reduce_flat(grads, tp_mesh.get_group(), tp_mesh.size())


def align_grads_with_params(params: list[torch.nn.Parameter], tp_mesh: DeviceMesh) -> None:
    """Gives every TP gradient its parameter's layout. Sequence parallel leaves the layernorms' gradients as
    per-rank partial sums: they are summed over the TP group in one collective. A vocab-parallel
    embedding's gradient comes back replicated: it is cut to the parameter's shard (no communication)."""
    partial = []
    for p in params:
        g = p.grad
        if not isinstance(g, DTensor) or g.device_mesh != tp_mesh or g.placements == p.placements:
            continue
        if g.placements[0].is_partial() and p.placements[0].is_replicate():
            partial.append(p)
        else:
            p.grad = g.redistribute(placements=p.placements)
    if partial:
        summed = [p.grad.to_local() for p in partial]
        all_reduce_flat(summed, tp_mesh.get_group())
        for p, t in zip(partial, summed, strict=True):
            p.grad = DTensor.from_local(t, tp_mesh, p.placements, run_check=False)


def all_reduce_flat(tensors: list[torch.Tensor], group, divide_by: int = 1) -> None:
    """Sums (then divides, for a mean: gloo has no AVG) tensors over a group with one collective."""
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    if divide_by != 1:
        flat /= divide_by
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def global_grad_norm(
    params: list[torch.nn.Parameter],
    pipeline_group=None,
    duplicate: torch.nn.Parameter | None = None,
) -> torch.Tensor:
    """The gradient norm over every rank's parameters (any mix of plain and DTensor gradients: TP, FSDP,
    both), as a tensor: each parameter counted once, a sharded gradient's norm assembled over the mesh
    dimensions it is sharded on. Pipeline stages hold different parameters: their squared norms are summed
    over `pipeline_group`, where the last stage's copy of a tied embedding (`duplicate`) is not counted."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    local = [local_tensor(g) for g in grads]
    norms = list(torch._foreach_norm(local)) if local else []
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
    counted = [n for n, p in zip(norms, params, strict=True) if p is not duplicate]
    total_sq = torch.stack(counted).square().sum() if counted else torch.zeros((), device=norms[0].device)
    if duplicate is not None and duplicate.grad is not None:
        # Not counted, but an overflow in it still has to skip the step.
        copy_norm = norms[next(i for i, p in enumerate(params) if p is duplicate)]
        total_sq = total_sq + torch.where(torch.isfinite(copy_norm), 0.0, float("inf"))
    if pipeline_group is not None:
        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=pipeline_group)
    return total_sq.sqrt()


def clip_grad_norm(
    params: list[torch.nn.Parameter],
    max_norm: float,
    pipeline_group=None,
    duplicate: torch.nn.Parameter | None = None,
) -> float:
    """torch's clip_grad_norm_ over this layout's gradients (global_grad_norm); max_norm <= 0: measure only."""
    total = global_grad_norm(params, pipeline_group, duplicate)
    norm = total.item()
    # Scaled only when the norm is over the limit (a non-finite norm skips the step anyway): most steps of a
    # run are not clipped, and multiplying every gradient by 1.0 costs a pass over all of them.
    if max_norm > 0 and max_norm < norm + 1e-6:
        torch._foreach_mul_(
            [local_tensor(p.grad) for p in params if p.grad is not None], max_norm / (total + 1e-6)
        )
    return norm
