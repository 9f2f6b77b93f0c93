"""Which samples a data-parallel rank reads, as a pure function of consumed samples (no torch).

A global batch of B samples starting at `consumed` is cut into micro-batches of micro_batch x dp consecutive
samples; rank r takes the r-th slice of each (Megatron's MegatronPretrainingSampler). A resumed run, or one
on another dp size, therefore reads exactly the samples an uninterrupted run would have read next.
"""

from __future__ import annotations


def micro_batches_per_step(global_batch: int, micro_batch: int, dp: int) -> int:
    """Micro batches each data-parallel rank runs per optimizer step: global batch / (micro batch x dp)."""
    if global_batch % (micro_batch * dp):
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro batch {micro_batch} x dp {dp}"
        )
    return global_batch // (micro_batch * dp)


def micro_batch_indices(
    consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    chunk = micro_batch * dp_size
    return [
        list(
            range(
                consumed + j * chunk + dp_rank * micro_batch,
                consumed + j * chunk + (dp_rank + 1) * micro_batch,
            )
        )
        for j in range(micro_batches_per_step(global_batch, micro_batch, dp_size))
    ]
