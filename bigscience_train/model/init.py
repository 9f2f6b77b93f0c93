"""Megatron's initialisation, defined so that any part of a weight can be drawn on its own.

Each weight's rows are cut into blocks of about a million values, and each block draws from its own
generator, seeded by the run's seed, the weight's name and the block's index. A rank that holds a shard
(tensor-parallel, FSDP, a pipeline stage) draws only the blocks its rows fall in, so it never allocates the
whole weight, and gets exactly the values the whole model built in one process has there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

BLOCK_VALUES = 1 << 20

# A parameter's local tensor (the part this process holds) and that part's offset in the whole weight.
LocalPart = Callable[[torch.Tensor], tuple[torch.Tensor, Sequence[int]]]


def whole(param: torch.Tensor) -> tuple[torch.Tensor, Sequence[int]]:
    """A process that holds the whole parameter."""
    return param, (0,) * param.ndim


def draw_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def rows_per_block(shape: Sequence[int]) -> int:
    return max(1, BLOCK_VALUES // math.prod(shape[1:]))


@torch.no_grad()
def normal_part(
    local: torch.Tensor, shape: Sequence[int], offset: Sequence[int], std: float, seed: int, name: str
) -> None:
    """Fills `local`, the part at `offset` of a weight of `shape`, with N(0, std) values of that weight."""
    if local.numel() == 0:
        return
    first, stop = offset[0], offset[0] + local.shape[0]
    columns = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:], strict=True))
    rows = rows_per_block(shape)
    for block in range(first // rows, -(-stop // rows)):
        start = block * rows
        end = min(start + rows, shape[0])
        generator = torch.Generator(local.device).manual_seed(draw_seed(seed, name, block))
        values = torch.empty((end - start, *shape[1:]), device=local.device).normal_(
            0.0, std, generator=generator
        )
        lo, hi = max(first, start), min(stop, end)
        local[lo - first : hi - first].copy_(values[(slice(lo - start, hi - start), *columns)])
