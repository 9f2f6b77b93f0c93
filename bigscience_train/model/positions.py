"""Position information: ALiBi biases and rotary embeddings (learned positions are an nn.Embedding in gpt.py)."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022), as BLOOM computes them.

    For a power of two n the slopes are 2^(-8/n), 2^(-16/n), ...; otherwise the slopes of the closest lower
    power of two, completed by every other slope of the next power of two.
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-8.0 / (2 * closest))
        slopes += [extra_base ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_causal_bias(slopes: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias of shape (1, heads, seq, seq): -slope * distance to the key, -inf on future keys.

    Four dimensions, broadcast over the batch: SDPA's fused kernels take such a mask and keep one copy of it
    for backward, where a 3-D mask sends them to the math path, which stores every (batch, head) score matrix.
    """
    pos = torch.arange(seq_len, device=slopes.device)
    distance = (pos[:, None] - pos[None, :]).to(torch.float32)
    bias = -slopes[:, None, None] * distance
    bias = bias.masked_fill(distance < 0, float("-inf"))
    return bias.to(dtype)[None]


def rotary_inv_freq(head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rotary_cos_sin(
    inv_freq: torch.Tensor, seq_len: int, dtype: torch.dtype, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq, head_dim) for positions 0..seq_len-1, or (batch, 1, seq, head_dim)
    for the position of each token in position_ids (batch, seq)."""
    if position_ids is None:
        t = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    else:
        t = position_ids.to(torch.float32)
    freqs = t[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    if position_ids is not None:
        emb = emb.unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by position (GPT-NeoX's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
