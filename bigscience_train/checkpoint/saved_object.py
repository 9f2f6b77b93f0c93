"""The object in a torch.save archive held in memory, with no code run from its pickle; tensors view that memory.

DCP writes each item as a torch.save archive: a zip file whose `data.pkl` pickles the object and whose
`data/<key>` records hold tensor bytes, uncompressed and 64-byte aligned. torch.load would copy those bytes into
fresh memory (slow where first touches are slow, as in virtual machines) and unpickle with its Python-level
weights-only unpickler (about 0.1 ms for a float). Here the C unpickler reads data.pkl with only the names that
plain values and tensors use. Anything else (another byte order, a tensor subclass, an unknown name) goes through
torch.load with weights_only=True, which refuses what is not data.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import sys
import zipfile

import torch

ALIGNMENT = 64  # torch.save's record alignment: an archive placed at such an offset gives aligned views

# The typed storage classes a pickle names (torch.FloatStorage...); `_dtype` is their dtype without the
# deprecation warning that `dtype` gives.
_STORAGE_DTYPES = {
    cls.__name__: cls._dtype
    for cls in torch.storage._LegacyStorage.__subclasses__()
    if isinstance(cls._dtype, torch.dtype)
}
_END_OF_DIRECTORY = struct.Struct("<IHHHHIIH")
_DIRECTORY_ENTRY = struct.Struct("<IHHHHHHIIIHHHHHII")
_LOCAL_HEADER_SIZE = 30
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_TENSOR_RECORD = re.compile(rb"[^/]*/data/\d+")
_SATURATED = (0xFFFF, 0xFFFFFFFF)
_SMALL_ARCHIVE = 64 << 10  # zip64 or a comment: zipfile reads those


class _Unusual(Exception):
    """An archive this fast path does not read; torch.load (weights only) does."""


class _MemoryFile(io.RawIOBase):
    """A read-only file over a memoryview, so that zipfile reads the directory without copying the data."""

    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = offset + (0, self.pos, len(self.view))[whence]
        return self.pos

    def readinto(self, buffer) -> int:
        part = self.view[self.pos : self.pos + len(buffer)]
        buffer[: len(part)] = part
        self.pos += len(part)
        return len(part)


def _local_header_name(view, position: int) -> bytes | None:
    """The record name in the local header at `position`; None if no local header starts there."""
    if bytes(view[position : position + 4]) != _LOCAL_HEADER_SIGNATURE:
        return None
    name_length = struct.unpack_from("<H", view, position + 26)[0]
    return bytes(view[position + _LOCAL_HEADER_SIZE : position + _LOCAL_HEADER_SIZE + name_length])


def _data_start(view: memoryview, local_header: int, readable=None) -> int:
    _check(readable, local_header, _LOCAL_HEADER_SIZE)
    name_length, extra_length = struct.unpack_from("<HH", view, local_header + 26)
    return local_header + _LOCAL_HEADER_SIZE + name_length + extra_length


def _check(readable, offset: int, size: int) -> None:
    """For an archive read in part: the bytes about to be parsed must be among those read."""
    if readable is not None and not readable(offset, size):
        raise _Unusual


def _records(view: memoryview, readable=None) -> dict[str, tuple[int, int]]:
    """Offset and size of each record of the archive, named without the archive's top folder. The central
    directory is read with struct; an archive with zip64 fields or a comment, with zipfile. `readable(offset,
    size)`, where only some of the archive's bytes are in `view`, says which."""
    _check(readable, len(view) - 22, 22)
    signature, *_, count, _, directory, comment = _END_OF_DIRECTORY.unpack_from(view, len(view) - 22)
    if signature != 0x06054B50 or count in _SATURATED or directory in _SATURATED or comment:
        return _records_by_zipfile(view, readable)
    records, position = {}, directory
    for _ in range(count):
        _check(readable, position, _DIRECTORY_ENTRY.size)
        entry = _DIRECTORY_ENTRY.unpack_from(view, position)
        method, size, name_length, extra_length, comment_length, local_header = (
            entry[4],
            entry[9],
            entry[10],
            entry[11],
            entry[12],
            entry[16],
        )
        if (
            entry[0] != 0x02014B50
            or method != zipfile.ZIP_STORED
            or size in _SATURATED
            or local_header in _SATURATED
        ):
            return _records_by_zipfile(view, readable)
        _check(readable, position + 46, name_length)
        name = bytes(view[position + 46 : position + 46 + name_length]).decode()
        records[name.partition("/")[2]] = (_data_start(view, local_header, readable), size)
        position += 46 + name_length + extra_length + comment_length
    return records


def _records_by_zipfile(view: memoryview, readable=None) -> dict[str, tuple[int, int]]:
    if readable is not None:  # zipfile may read any byte, not only those read
        raise _Unusual
    records = {}
    for info in zipfile.ZipFile(_MemoryFile(view)).infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Unusual
        records[info.filename.partition("/")[2]] = (_data_start(view, info.header_offset), info.file_size)
    return records


def _tensor_records(view: memoryview, readable=None) -> dict[str, tuple[int, int]]:
    """The records, for an archive whose tensor bytes are in this machine's byte order."""
    records = _records(view, readable)
    order = records.get("byteorder")
    if order is not None:
        _check(readable, *order)
        if bytes(view[order[0] : order[0] + order[1]]) != sys.byteorder.encode():
            raise _Unusual
    return records


class _DataUnpickler(pickle.Unpickler):
    """Reads data.pkl, the archive's first record. A small archive (a value, no tensor data) held whole is read
    from where data.pkl starts to the pickle's own end, with no look at the zip directory; a large one (tensor
    data: megabytes not to copy) or one read in part is sliced to data.pkl's size from the directory. What a
    tensor's storage becomes is the subclass's `storage`."""

    def __init__(self, view: memoryview, readable=None):
        name = _local_header_name(view, 0)
        if name is None or not name.endswith(b"/data.pkl"):
            raise _Unusual
        self.view, self.readable = view, readable
        small = len(view) <= _SMALL_ARCHIVE and readable is None
        self.records = None if small else _tensor_records(view, readable)
        start = _data_start(view, 0)
        end = start + self.records["data.pkl"][1] if self.records else len(view)
        _check(readable, start, end - start)
        super().__init__(io.BytesIO(view[start:end]))

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise _Unusual

    def persistent_load(self, pid):
        if self.records is None:
            self.records = _tensor_records(self.view, self.readable)
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype) or f"data/{key}" not in self.records:
            raise _Unusual
        start, size = self.records[f"data/{key}"]
        if size != numel * dtype.itemsize:
            raise _Unusual
        return self.storage(start, size, dtype)

    def storage(self, start: int, size: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


class _ArchiveUnpickler(_DataUnpickler):
    """Tensors view the archive's memory."""

    def __init__(self, archive: torch.Tensor):
        super().__init__(memoryview(archive.numpy()))
        self.archive = archive

    def storage(self, start: int, size: int, dtype: torch.dtype) -> torch.Tensor:
        data = self.archive[start : start + size]
        if data.data_ptr() % ALIGNMENT or data.storage_offset() % dtype.itemsize:
            data = data.clone()
        return data.view(dtype)


class _LayoutUnpickler(_DataUnpickler):
    """Tensors on the meta device (dtype, shape, strides, no data); `placed` keeps where their bytes are."""

    placed: tuple[int, int] | None = None

    def storage(self, start: int, size: int, dtype: torch.dtype) -> torch.Tensor:
        if self.placed is not None:  # a second storage: not one tensor
            raise _Unusual
        self.placed = (start, size)
        return torch.empty(size // dtype.itemsize, dtype=dtype, device="meta")


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if any(n == 0 for n in size):
        return storage[:0].reshape(size)
    end = storage_offset + sum((n - 1) * step for n, step in zip(size, stride, strict=True)) + 1
    if storage_offset < 0 or min(stride, default=0) < 0 or end > storage.numel():
        raise _Unusual
    return storage.as_strided(size, stride, storage.storage_offset() + storage_offset)


def saved_object(archive: torch.Tensor):
    """What a torch.save archive holds; `archive` is a uint8 tensor of its bytes. Its tensors view `archive`'s
    memory where the archive starts at an ALIGNMENT-aligned address."""
    try:
        return _ArchiveUnpickler(archive).load()
    except _Unusual:
        return torch.load(io.BytesIO(memoryview(archive.numpy())), map_location="cpu", weights_only=True)


def saved_tensor_layout(view: memoryview, readable) -> tuple[int, torch.Tensor] | None:
    """Where the bytes of the one tensor a torch.save archive holds start in it, and that tensor on the meta
    device (dtype, shape, strides), from a `view` of the archive's length in which only the bytes that
    `readable(offset, size)` accepts were read: its first and last few kB hold the pickle, the local headers
    before the data and the directory. None where the archive is anything else or needs other bytes."""
    try:
        unpickler = _LayoutUnpickler(view, readable)
        tensor = unpickler.load()
    except Exception:  # whatever the bytes are, reading the archive whole reports it
        return None
    if not isinstance(tensor, torch.Tensor) or unpickler.placed is None:
        return None
    return unpickler.placed[0], tensor


def tensor_record_start(head: memoryview) -> int | None:
    """Where the first tensor record's bytes start (`data/<key>`), from the local headers among an archive's
    first bytes; None if it is not among them. A guess for reading those bytes in place: the local headers of
    torch.save's records are followed by data descriptors, so only the central directory, at the end, is sure."""
    raw = bytes(head)
    position = raw.find(_LOCAL_HEADER_SIGNATURE)
    while 0 <= position <= len(raw) - _LOCAL_HEADER_SIZE:
        if _TENSOR_RECORD.fullmatch(_local_header_name(raw, position)):
            start = _data_start(head, position)
            return start if start <= len(raw) else None
        position = raw.find(_LOCAL_HEADER_SIGNATURE, position + 1)
    return None
