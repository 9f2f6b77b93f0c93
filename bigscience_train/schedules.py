"""Batch-size ramp-up and learning-rate schedule, both driven by consumed samples (as Megatron's).

Driving them by samples, not steps, keeps a resumed or re-laid-out run on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSizeSchedule:
    """Megatron's --rampup-batch-size start increment samples: the global batch grows from `start` by
    `increment` every `samples / ((global - start) / increment)` consumed samples until it reaches `global_batch`."""

    global_batch: int
    start: int | None = None
    increment: int | None = None
    ramp_samples: int | None = None

    @classmethod
    def from_config(cls, global_batch: int, rampup: list[int]) -> BatchSizeSchedule:
        if not rampup:
            return cls(global_batch)
        start, increment, samples = rampup
        return cls(global_batch, start, increment, samples)

    def at(self, consumed_samples: int) -> int:
        if self.start is None or self.start == self.global_batch:
            return self.global_batch
        num_increments = (self.global_batch - self.start) // self.increment
        samples_per_increment = self.ramp_samples / num_increments
        steps = int(consumed_samples // samples_per_increment)
        return min(self.start + steps * self.increment, self.global_batch)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to `max_lr` over `warmup` units, then cosine or linear decay to `min_lr` at `decay` units
    (units: samples, or tokens when decaying by tokens), constant `min_lr` after."""

    max_lr: float
    min_lr: float
    warmup: int
    decay: int
    style: str = "cosine"

    def at(self, progress: float) -> float:
        if self.warmup > 0 and progress < self.warmup:
            return self.max_lr * progress / self.warmup
        if self.style == "constant":
            return self.max_lr
        if progress >= self.decay:
            return self.min_lr
        ratio = (progress - self.warmup) / max(self.decay - self.warmup, 1)
        coeff = 1.0 - ratio if self.style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)


def total_train_samples(
    iters: int | None, tokens: int | None, seq_length: int, schedule: BatchSizeSchedule
) -> int:
    """Samples the run consumes before train.iters or train.tokens ends it, whichever comes first."""
    limit_by_tokens = math.ceil(tokens / seq_length) if tokens is not None else None
    if iters is None:
        return limit_by_tokens
    consumed = 0
    for _ in range(iters):
        if limit_by_tokens is not None and consumed >= limit_by_tokens:
            break
        consumed += schedule.at(consumed)
    return consumed
