"""Which samples a data-parallel rank reads, as a pure function of consumed samples.

A global batch of B samples starting at `consumed` is cut into micro-batches of micro_batch x dp consecutive
samples; rank r takes the r-th slice of each (Megatron's MegatronPretrainingSampler). A resumed run, or one
on another dp size, therefore reads exactly the samples an uninterrupted run would have read next.
"""

from __future__ import annotations

import torch


def micro_batch_indices(
    consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    chunk = micro_batch * dp_size
    if global_batch % chunk:
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro batch {micro_batch} x dp {dp_size}"
        )
    return [
        list(
            range(
                consumed + j * chunk + dp_rank * micro_batch,
                consumed + j * chunk + (dp_rank + 1) * micro_batch,
            )
        )
        for j in range(global_batch // chunk)
    ]


def collate(dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    samples = [dataset[i] for i in indices]
    return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")}
