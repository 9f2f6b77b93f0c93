"""megatron-core's .bin/.idx format, imported in one place with its optional-dependency warnings silenced."""

from __future__ import annotations

import os
import warnings

with warnings.catch_warnings():
    # megatron-core warns at import that Transformer Engine and apex are absent; we use neither.
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import (
        _INDEX_HEADER,
        IndexedDataset,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )


def bin_path(prefix: str) -> str:
    return get_bin_path(prefix)


def idx_path(prefix: str) -> str:
    return get_idx_path(prefix)


def open_indexed(prefix: str) -> IndexedDataset:
    """Opens PREFIX.bin/.idx, turning megatron-core's bare assertions into errors that name the file."""
    try:
        with open(idx_path(prefix), "rb") as file:
            header = file.read(len(_INDEX_HEADER))
        open(bin_path(prefix), "rb").close()
    except OSError as e:
        raise FileNotFoundError(f"dataset file {e.filename}: {e.strerror}") from None
    # Checked here, not left to megatron-core: its IndexedDataset, failing in its constructor, fails again
    # in __del__ and prints that traceback beside our error.
    if header != _INDEX_HEADER:
        raise ValueError(f"dataset {idx_path(prefix)} is not a valid Megatron index: bad header")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except Exception as e:
        raise ValueError(
            f"dataset {idx_path(prefix)} is not a valid Megatron index: {e or type(e).__name__}"
        ) from None
    index = dataset.index
    expected = (
        int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
        if len(index)
        else 0
    )
    actual = os.path.getsize(bin_path(prefix))
    if actual != expected:
        raise ValueError(
            f"dataset {bin_path(prefix)} has {actual} bytes but its index describes {expected}"
            f" ({'truncated' if actual < expected else 'trailing data'})"
        )
    return dataset


__all__ = ["IndexedDataset", "IndexedDatasetBuilder", "bin_path", "idx_path", "open_indexed"]
