"""Activation recompute, applied to a built model from outside (the model code has no checkpointing in it).

full: each transformer block keeps only its input; the whole block's forward is re-run in backward
(Megatron's --recompute-granularity full; 4 instead of 3 forward-equivalents of compute).
selective: matmul and attention outputs are kept, the cheap elementwise work between them (layernorm, GeLU,
dropout, bias adds) is recomputed: most of the activation memory back for a few percent of compute.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from bigscience_train.model.gpt import Block

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(model: torch.nn.Module, mode: str) -> None:
    if mode == "none":
        return
    if mode == "full":
        wrapper = checkpoint_wrapper
    elif mode == "selective":
        contexts = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
        wrapper = functools.partial(checkpoint_wrapper, context_fn=contexts)
    else:
        raise ValueError(f"parallel.recompute={mode!r} is not one of none, selective, full")
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block)
    )
