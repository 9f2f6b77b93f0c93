"""Concatenates .bin/.idx datasets into one, document boundaries kept (as megatron-core's add_index)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bigscience_train.data.indexed import IndexedWriter, bin_path, idx_path, open_indexed
from bigscience_train.fsutil import temporary_sibling


def merge(prefixes: list[str], output_prefix: str) -> tuple[int, int]:
    """Writes output_prefix.bin/.idx; returns (documents, tokens). All inputs must share one token dtype."""
    if not prefixes:
        raise ValueError("merge needs at least one input prefix")
    datasets = [open_indexed(p) for p in prefixes]  # each checked: exists, valid index, complete .bin
    dtype = datasets[0].dtype
    for prefix, ds in zip(prefixes, datasets, strict=True):
        if ds.dtype != dtype:
            raise ValueError(
                f"{idx_path(prefix)} holds {np.dtype(ds.dtype).name} tokens but "
                f"{idx_path(prefixes[0])} holds {np.dtype(dtype).name}: re-tokenize one of them"
            )
    final_bin, final_idx = Path(bin_path(output_prefix)), Path(idx_path(output_prefix))
    final_bin.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = temporary_sibling(final_bin), temporary_sibling(final_idx)
    try:
        with IndexedWriter(str(tmp_bin), dtype) as writer:
            for ds in datasets:
                writer.add_dataset(ds)
            writer.finalize(str(tmp_idx))
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    finally:
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    return sum(ds.num_documents for ds in datasets), sum(ds.num_tokens for ds in datasets)
