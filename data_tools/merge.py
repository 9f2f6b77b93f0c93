"""Concatenates .bin/.idx datasets into one, document boundaries kept (megatron-core's add_index)."""

from __future__ import annotations

import os
from pathlib import Path

from bigscience_train.data.indexed import IndexedDatasetBuilder, bin_path, idx_path, open_indexed
from bigscience_train.fsutil import temporary_sibling


def merge(prefixes: list[str], output_prefix: str) -> tuple[int, int]:
    """Writes output_prefix.bin/.idx; returns (documents, tokens). All inputs must share one token dtype."""
    if not prefixes:
        raise ValueError("merge needs at least one input prefix")
    datasets = [open_indexed(p) for p in prefixes]  # each checked: exists, valid index, complete .bin
    dtype = datasets[0].index.dtype
    for prefix, ds in zip(prefixes, datasets, strict=True):
        if ds.index.dtype != dtype:
            raise ValueError(
                f"{idx_path(prefix)} holds {ds.index.dtype.__name__} tokens but "
                f"{idx_path(prefixes[0])} holds {dtype.__name__}: re-tokenize one of them"
            )
    final_bin, final_idx = Path(bin_path(output_prefix)), Path(idx_path(output_prefix))
    final_bin.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = temporary_sibling(final_bin), temporary_sibling(final_idx)
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    finally:
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    documents = sum(len(ds.document_indices) - 1 for ds in datasets)
    tokens = sum(int(ds.sequence_lengths.sum()) for ds in datasets)
    return documents, tokens
