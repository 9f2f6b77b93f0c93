"""Causal self-attention kernels: PyTorch's SDPA or FlexAttention.

sdpa: ALiBi enters as an additive (1, heads, seq, seq) bias, which keeps SDPA off its flash kernel (that one
takes no bias): the fused kernels that take a bias compute every block of the score matrix, the masked half
too.
flex: ALiBi is a score modification computed inside the kernel in fp32, and the block mask skips the blocks
above the diagonal. FlexAttention is compiled (Triton on GPUs); torch has no CPU backward for it, so it is for
training on GPUs. All return (batch, heads, seq, head_dim).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from bigscience_train.model import positions


@dataclass(frozen=True)
class FlexMask:
    """What FlexAttention needs: the causal block mask, and ALiBi slopes (of this rank's heads) or None."""

    block_mask: BlockMask
    alibi_slopes: torch.Tensor | None


# What a block's attention takes: an additive bias (SDPA with ALiBi), None (SDPA, causal) or a FlexMask.
AttentionMask = torch.Tensor | FlexMask | None


def _causal(batch, head, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=8)
def causal_block_mask(seq_len: int, device: torch.device) -> BlockMask:
    """One per sequence length and device: building it walks the whole mask once."""
    return create_block_mask(_causal, None, None, seq_len, seq_len, device=device)


def causal_mask(
    backend: str,
    alibi_slopes: torch.Tensor | None,
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> AttentionMask:
    """The mask every block of one forward shares. alibi_slopes: None for models without ALiBi."""
    if backend == "flex":
        return FlexMask(causal_block_mask(seq_len, device), alibi_slopes)
    if alibi_slopes is None:
        return None
    return positions.alibi_causal_bias(alibi_slopes, seq_len, dtype)


def _document_causal(document_ids: torch.Tensor):
    def mask_mod(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[batch, q_idx] == document_ids[batch, kv_idx])

    return mask_mod


def within_documents(mask: AttentionMask, document_ids: torch.Tensor) -> AttentionMask:
    """`mask` (causal_mask's) restricted to keys in the query's own document, as Megatron's reset attention
    mask has it; document_ids (batch, seq) numbers each token's document in its sample.

    flex: a block mask per batch, which also skips the blocks between documents. sdpa: a boolean
    (batch, 1, seq, seq) mask, or with ALiBi its bias with -inf across documents, (batch, heads, seq, seq):
    SDPA takes one mask, and Megatron's fused softmax held the same scores."""
    batch, seq = document_ids.shape
    if isinstance(mask, FlexMask):
        block_mask = create_block_mask(
            _document_causal(document_ids), batch, None, seq, seq, device=document_ids.device
        )
        return FlexMask(block_mask, mask.alibi_slopes)
    same = document_ids[:, None, :, None] == document_ids[:, None, None, :]
    if mask is None:
        return same & torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return mask.masked_fill(~same, float("-inf"))


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: FlexMask) -> torch.Tensor:
    slopes = mask.alibi_slopes
    score_mod = None
    if slopes is not None:
        # Created inside the compiled function: a closure made outside would be a new object per call, and
        # each would cost a recompilation.
        def score_mod(score, batch, head, q_idx, kv_idx):
            return score - slopes[head] * (q_idx - kv_idx)

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=mask.block_mask)


@functools.cache
def _compiled_flex():
    """Eager flex_attention computes the whole score matrix in Python ops; compiled, it is one fused kernel.
    Made on first use, since setting up torch.compile is not free."""
    return torch.compile(_flex, dynamic=False)


def causal_attention(
    qkv: torch.Tensor, mask: AttentionMask, rope: tuple[torch.Tensor, torch.Tensor] | None, dropout: float
) -> torch.Tensor:
    """qkv: (batch, seq, heads, 3, head_dim), per head [q, k, v] (BLOOM's fused projection). rope: the cos and
    sin tables of rotary positions, or None. Returns (batch, heads, seq, head_dim)."""
    # unbind, not indexing: its backward stacks the three gradients into one tensor, where each index's
    # backward would zero a whole qkv-sized tensor and the three would then be summed.
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))
    if rope is not None:
        q, k = positions.apply_rotary(q, *rope), positions.apply_rotary(k, *rope)
    if isinstance(mask, FlexMask):
        # Inside a compiled block, traced into the block's graph.
        flex = _flex if torch.compiler.is_compiling() else _compiled_flex()
        return flex(q, k, v, mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
