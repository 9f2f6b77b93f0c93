"""Language-modelling loss over masked tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


def masked_lm_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses where loss_mask is set, number of such tokens); logits in fp32 for the softmax."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    if isinstance(losses, DTensor):  # vocab-parallel logits under loss_parallel: replicated token losses
        losses = losses.to_local()
    mask = loss_mask.flatten().to(losses.dtype)
    return (losses * mask).sum(), mask.sum()
