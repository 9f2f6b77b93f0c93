"""The output layer and its cross-entropy fused, in chunks of tokens.

Unfused, the logits (tokens x vocab, fp32 for the softmax) exist whole, then a log-softmax of them, then a
gradient of them: three tensors of that size (at BLOOM's vocabulary of 250,880, 1 GB per 1,024 tokens each).
Fused, one chunk's logits exist at a time, and the same pass that computes the chunk's loss turns its
logits into their gradient (softmax minus one-hot), multiplies it into the gradients of the hidden states and
of the output weight, and drops it. Backward then only scales those gradients by the loss's own gradient.
"""

from __future__ import annotations

import torch

from bigscience_train.model.output_chunks import chunk_tokens


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `t` run in: autocast's where it is on for t's device, else t's own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


class _OutputLayerLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_mask, compute_dtype):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # fp16 gradients, computed here before the loss scale multiplies them, would underflow.
        grad_dtype = torch.float32 if compute_dtype == torch.float16 else compute_dtype
        weight_c = weight.to(compute_dtype)
        weight_g = weight_c if grad_dtype == compute_dtype else weight.to(grad_dtype)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = chunk_tokens(weight.shape[0], hidden.device.type != "cpu")
        # One buffer for every chunk's logits, rather than an allocation per chunk.
        buffer = hidden.new_empty((min(step, hidden.shape[0]), weight.shape[0]), dtype=compute_dtype)
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            h, target, mask = hidden[rows], labels[rows, None], loss_mask[rows]
            logits = torch.mm(h.to(compute_dtype), weight_c.t(), out=buffer[: h.shape[0]]).float()
            target_logit = logits.gather(1, target).squeeze(1)
            # log-sum-exp in place, the exponentials kept: they are the softmax's numerators.
            row_max = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            exp_sum = exp.sum(dim=1)
            loss_sum += ((row_max.squeeze(1) + exp_sum.log() - target_logit) * mask).sum()
            if not (want_hidden or want_weight):
                continue
            # d(masked loss sum)/d(logits) = mask * (softmax - one-hot), computed in place of the logits.
            grad_logits = exp.mul_((mask / exp_sum)[:, None])
            grad_logits.scatter_add_(1, target, -mask[:, None])
            grad_logits = grad_logits.to(grad_dtype)
            if want_hidden:
                grad_hidden[rows] = grad_logits @ weight_g
            if not want_weight:
                continue
            # The output weight's gradient is accumulated in fp32, the first chunk's product starting it.
            h_g = h.to(grad_dtype)
            if grad_weight is None:
                grad_weight = (grad_logits.t() @ h_g).float()
            elif grad_dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), h_g)
            else:
                grad_weight += grad_logits.t() @ h_g
        ctx.weight_dtype = weight.dtype
        ctx.used = False
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        # The gradients are scaled in place (a copy of the output weight's would be one more pass over it),
        # so they can be taken once.
        if ctx.used:
            raise RuntimeError("the fused output loss's backward runs once: no retain_graph through it")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def output_layer_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses where loss_mask is set, number of such tokens) of the logits hidden @ weight.T,
    without materialising them. hidden (..., hidden size), weight (vocab, hidden size), labels and loss_mask
    of hidden's leading shape. Under autocast the matmuls run in its dtype and the softmax in fp32, as the
    unfused output layer and loss do."""
    mask = loss_mask.flatten().float()
    with torch.autocast(hidden.device.type, enabled=False):
        loss_sum = _OutputLayerLoss.apply(
            hidden.flatten(0, -2), weight, labels.flatten(), mask, matmul_dtype(hidden)
        )
    return loss_sum, mask.sum()
