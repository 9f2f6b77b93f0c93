"""Megatron's .bin/.idx token datasets in numpy alone: the files megatron-core writes, byte for byte.

The .bin holds every sequence's tokens back to back. The .idx holds a header (`MMIDIDX\\x00\\x00`, version 1
as a little-endian u64, the token dtype's code as a u8, the sequence count and the document-index count as
u64), then the sequence lengths (int32), each sequence's byte offset in the .bin (int64) and the document
indices (int64: 0, then the number of sequences up to the end of each document). This module is our own
because importing megatron-core's indexed_dataset pulls in torch and megatron-core's whole parallel stack,
a start-up that every preprocessing shard job and every `data inspect` would pay for a file format.
"""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
# megatron-core's DType codes.
DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
_FIXED = struct.Struct("<9sQBQQ")  # header, version, dtype code, sequence count, document-index count


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def token_dtype(vocab_size: int) -> type:
    """The dtype megatron-core picks for token ids (its DType.optimal_dtype)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDataset:
    """A .bin/.idx dataset, memory-mapped: dataset[i] is sequence i's tokens, a read-only view of the .bin."""

    def __init__(self, prefix: str, dtype: type, lengths, pointers, document_indices, tokens):
        self.prefix, self.dtype, self._tokens = prefix, dtype, tokens
        self.sequence_lengths = lengths  # int32, tokens per sequence
        self.sequence_pointers = pointers  # int64, each sequence's byte offset in the .bin
        self.document_indices = document_indices  # int64, 0 then the sequences up to each document's end

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(
            self._tokens,
            self.dtype,
            count=int(self.sequence_lengths[i]),
            offset=int(self.sequence_pointers[i]),
        )


def open_indexed(prefix: str) -> IndexedDataset:
    """Opens PREFIX.bin/.idx; a missing file, a bad index or a wrong-sized .bin is an error naming it."""
    idx, bin_ = idx_path(prefix), bin_path(prefix)
    try:
        idx_size, bin_size = os.path.getsize(idx), os.path.getsize(bin_)
    except OSError as e:
        raise FileNotFoundError(f"dataset file {e.filename}: {e.strerror}") from None

    def invalid(why: str) -> ValueError:
        return ValueError(f"dataset {idx} is not a valid Megatron index: {why}")

    if idx_size < _FIXED.size:
        raise invalid("bad header")
    index = np.memmap(idx, dtype=np.uint8, mode="r")
    if bytes(index[: len(HEADER)]) != HEADER:
        raise invalid("bad header")
    _, version, code, sequences, documents = _FIXED.unpack_from(index)
    if version != VERSION:
        raise invalid(f"version {version}, not {VERSION}")
    if code not in DTYPES:
        raise invalid(f"unknown dtype code {code}")
    expected = _FIXED.size + 12 * sequences + 8 * documents
    if idx_size != expected:
        raise invalid(f"{idx_size} bytes where its header describes {expected}")
    lengths = index[_FIXED.size : _FIXED.size + 4 * sequences].view(np.int32)
    pointers = index[_FIXED.size + 4 * sequences : _FIXED.size + 12 * sequences].view(np.int64)
    document_indices = index[_FIXED.size + 12 * sequences :].view(np.int64)
    if not documents or document_indices[0] != 0 or document_indices[-1] != sequences:
        raise invalid("its document indices do not span its sequences")
    dtype = DTYPES[code]
    described = int(pointers[-1]) + int(lengths[-1]) * np.dtype(dtype).itemsize if sequences else 0
    if bin_size != described:
        raise ValueError(
            f"dataset {bin_} has {bin_size} bytes but its index describes {described}"
            f" ({'truncated' if bin_size < described else 'trailing data'})"
        )
    # numpy cannot map an empty file.
    tokens = np.memmap(bin_, dtype=np.uint8, mode="r") if bin_size else np.empty(0, np.uint8)
    return IndexedDataset(prefix, dtype, lengths, pointers, document_indices, tokens)


class IndexedWriter:
    """Writes a .bin as documents arrive and its .idx at `finalize`; one sequence per document. A context
    manager, so that a run that fails midway leaves its .bin closed."""

    def __init__(self, bin_file: str, dtype: type):
        if np.dtype(dtype).type not in CODES:
            raise ValueError(f"token dtype {np.dtype(dtype).name} has no Megatron code")
        self.dtype = np.dtype(dtype).type
        self._bin = open(bin_file, "wb")  # noqa: SIM115 - closed by finalize, or on leaving a with block
        # Lengths per block of documents, joined at finalize: appending to one array would copy it each time.
        self._lengths: list[np.ndarray] = []
        self._document_ends: list[np.ndarray] = []
        self._sequences = 0

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._bin.close()

    def add_documents(self, tokens, lengths) -> None:
        """Appends documents of one sequence each: `tokens` their ids back to back, `lengths` their counts."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths add up to {int(lengths.sum())} tokens, not {len(tokens)}")
        if tokens.dtype != self.dtype and len(tokens):
            info = np.iinfo(self.dtype) if np.issubdtype(self.dtype, np.integer) else np.finfo(self.dtype)
            if tokens.min() < info.min or tokens.max() > info.max:
                raise ValueError(
                    f"token ids {tokens.min()}..{tokens.max()} do not fit {np.dtype(self.dtype).name}"
                )
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths.astype(np.int32))
        self._document_ends.append(self._sequences + np.arange(1, len(lengths) + 1, dtype=np.int64))
        self._sequences += len(lengths)

    def add_dataset(self, dataset: IndexedDataset) -> None:
        """Appends every document of `dataset` (same dtype), its document boundaries kept."""
        if dataset.dtype != self.dtype:
            raise ValueError(
                f"{idx_path(dataset.prefix)} holds {np.dtype(dataset.dtype).name} tokens, "
                f"not {np.dtype(self.dtype).name}"
            )
        self._lengths.append(np.array(dataset.sequence_lengths))
        self._document_ends.append(self._sequences + dataset.document_indices[1:])
        self._sequences += len(dataset)
        with open(bin_path(dataset.prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin)

    def finalize(self, idx_file: str) -> None:
        self._bin.close()
        lengths = np.concatenate([np.empty(0, np.int32), *self._lengths])
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= np.dtype(self.dtype).itemsize
        document_indices = np.concatenate([np.zeros(1, np.int64), *self._document_ends])
        with open(idx_file, "wb") as f:
            f.write(_FIXED.pack(HEADER, VERSION, CODES[self.dtype], len(lengths), len(document_indices)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(document_indices.tobytes())
