"""DCP's file reader, reading each file front to back on background threads.

DCP's FileSystemReader takes the items one at a time: a torch.load of each through a view of the file (a read
into fresh memory, then a copy into the state dict), so the disk waits while tensors are copied, and checking
the files' checksums costs a pass of its own. This reader groups the items a rank needs into chunks of
consecutive items. One thread reads the chunks in order (the last one first: see _Stream), in requests of at
most the readahead window, each through a fresh descriptor (see file_reads: loads measured 0.64 -> 0.79 of the
disk's read bandwidth, first loads 0.58-0.73 -> 0.82-0.84; a second reading thread, a second stream for the
disk, measured slower), and one more thread hashes every file the rank reads whole as its bytes go by. A large
tensor whose destination takes its bytes as they are (on the CPU, contiguous, same dtype and shape) is read
straight into it: no buffer pages, no copy (loads measured 0.64 -> 0.74 of the disk's read bandwidth). The
other items are read into reused buffers, each at an aligned offset, and the calling thread copies each tensor
from there (`saved_object`: a view, no copy) into its destination. The reads start as soon as DCP hands the
reader this rank's plan, before DCP's planning ends. Metadata and the items that are not tensors go through
safe_load: no code from the checkpoint runs.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import pickle
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from bigscience_train.checkpoint.file_reads import read_into
from bigscience_train.checkpoint.integrity import new_digest
from bigscience_train.checkpoint.safe_load import load_metadata
from bigscience_train.checkpoint.saved_object import (
    ALIGNMENT,
    saved_object,
    saved_tensor_layout,
    tensor_record_start,
)

CHUNK_BYTES = 64 << 20
READ_AHEAD = 3  # chunks being read while the calling thread copies out of one
DIRECT_BYTES = 1 << 20  # items this large are read straight into their destination where it allows
ARCHIVE_HEAD = 4096  # an archive's first bytes: its pickle and the local header before the tensor's bytes


@dataclass
class _Item:
    """One stored item and the requests that read from it (several where it overlaps several destinations)."""

    info: _StorageInfo
    requests: list[ReadItem] = field(default_factory=list)
    position: int = 0  # where the item starts in its chunk's buffer
    target: torch.Tensor | None = None  # the destination to read the tensor's bytes into, where it allows
    # Where the tensor's bytes start in the item, and the target's memory they were read into.
    placed: tuple[int, memoryview] | None = None

    def segments(self, buffer_memory: memoryview) -> list[memoryview]:
        """Where the item's bytes go (or went), in order: its place in the chunk's buffer, or that place
        around the target's bytes."""
        region = buffer_memory[self.position : self.position + self.info.length]
        if self.placed is None:
            return [region]
        start, data = self.placed
        return [region[:start], data, region[start + len(data) :]]


@dataclass
class _Chunk:
    relative_path: str
    items: list[_Item]
    nbytes: int  # buffer bytes, with each item padded to ALIGNMENT


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a load: DCP makes tens of thousands of small objects
    (metadata, plans, read items), enough to set off several full collections over a trainer's whole heap
    (0.3-0.4 s of a 1 GB load measured)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _padded(length: int) -> int:
    return -(-length // ALIGNMENT) * ALIGNMENT


def _runs(items: list[_Item]):
    """Runs of items stored back to back: one read each."""
    run: list[_Item] = []
    for item in items:
        if run and item.info.offset != run[-1].info.offset + run[-1].info.length:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _hash(chunk: _Chunk, buffer: torch.Tensor, hasher) -> None:
    """Chunks come in file order, so a whole file's hash is that of its bytes."""
    if hasher is None:
        return
    memory = memoryview(buffer.numpy())
    for item in chunk.items:
        for segment in item.segments(memory):
            hasher.update(segment)


def _direct_target(item: _Item, planner: LoadPlanner) -> torch.Tensor | None:
    """The destination that a large item's tensor can be read into as it is: on the CPU, contiguous."""
    if item.info.length < DIRECT_BYTES or len(item.requests) != 1:
        return None
    request = item.requests[0]
    if request.type != LoadItemType.TENSOR:
        return None
    target = planner.resolve_tensor(request).detach()
    return target if target.device.type == "cpu" and target.is_contiguous() else None


def _placement(item: _Item, head: memoryview) -> tuple[int, memoryview] | None:
    """Where the item's tensor bytes would start, from the archive's first bytes, and the target's memory to
    read them into. A guess that _confirm checks once the rest of the archive is read."""
    start = tensor_record_start(head)
    if start is None or start + item.target.nbytes > item.info.length:
        return None
    return start, memoryview(item.target.reshape(-1).view(torch.uint8).numpy())


def _confirm(item: _Item, region: memoryview) -> bool:
    """Whether the archive, read around its tensor's bytes, holds one tensor of the target's dtype and shape,
    saved whole and contiguous, whose bytes start where they were read from."""
    start, data = item.placed
    layout = saved_tensor_layout(
        region, lambda offset, size: offset + size <= start or offset >= start + len(data)
    )
    if layout is None:
        return False
    found, saved = layout
    return (
        found == start
        and saved.dtype == item.target.dtype
        and saved.shape == item.target.shape
        and saved.is_contiguous()
        and saved.storage_offset() == 0
    )


def _read_run(path, run: list[_Item], memory: memoryview) -> None:
    """Reads items stored back to back, in file order, each where its segments say. An item with a target
    needs its first bytes to place its tensor's: they come with the read before it (one small read for the
    run's first), so the disk sees one sequential pass; its own read starts at its first byte again (those few
    kB come from the page cache). An item whose archive turns out other than guessed is read again into the
    buffer, to be copied."""
    views, offset = [], run[0].info.offset
    for item in run:
        if item.target is not None:
            head = memory[item.position : item.position + min(ARCHIVE_HEAD, item.info.length)]
            read_into(path, [*views, head], offset)
            views, offset = [], item.info.offset
            item.placed = _placement(item, head)
        views += item.segments(memory)
    read_into(path, views, offset)
    for item in run:
        region = memory[item.position : item.position + item.info.length]
        if item.placed is not None and not _confirm(item, region):
            item.placed = None
            read_into(path, [region], item.info.offset)


def _stored_items(plan: LoadPlan) -> list[MetadataIndex]:
    """What a plan reads, in order: the reads started for one plan serve another only if these are equal."""
    return [request.storage_index for request in plan.items]


class _Stream:
    """The reads of one plan under way: a reading thread fills buffers READ_AHEAD chunks ahead of the copies.

    The last chunk is read first. DCP writes a file's tensors largest first, so its last chunk holds hundreds
    of small items (step counters, biases, layernorms), each parsed and copied on its own: read last, that
    work would all come after the disk is done. Its buffer waits for its turn to be hashed, in file order."""

    def __init__(self, root, chunks: list[_Chunk], hashers: dict):
        self.root, self.hashers = root, hashers
        self.planner: LoadPlanner | None = None  # known from read_data on: the reads into destinations
        self.chunks = chunks  # file order: the order they are hashed in
        order = list(range(len(chunks)))
        self.upcoming = ((index, chunks[index]) for index in order[-1:] + order[:-1])
        self.free: list[torch.Tensor] = []
        self.pending: deque = deque()
        self.chunk_bytes = max((chunk.nbytes for chunk in chunks), default=0)
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-read")
        self.hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash")
        self._read_next()

    def start(self, planner: LoadPlanner) -> None:
        """Reads READ_AHEAD chunks ahead from here on, into their destinations where those allow. Before, while
        DCP plans, only the first chunk is read (the last: small items, read into a buffer anyway): large
        items read then would take a buffer's fresh pages and a copy each."""
        self.planner = planner
        while len(self.pending) < READ_AHEAD and self._read_next():
            pass

    def _read_next(self) -> bool:
        upcoming = next(self.upcoming, None)
        if upcoming is None:
            return False
        index, chunk = upcoming
        if self.planner is not None:
            for item in chunk.items:
                item.target = _direct_target(item, self.planner)
        buffer = self._buffer(chunk.nbytes)
        self.pending.append((index, buffer, self.reader.submit(self._read_chunk, chunk, buffer)))
        return True

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A free buffer of at least `nbytes`, else a new one: at most READ_AHEAD + 2 exist at a time (one
        holds the last chunk until it is hashed)."""
        for index, buffer in enumerate(self.free):
            if buffer.numel() >= nbytes:
                return self.free.pop(index)
        if self.free:
            self.free.pop()
        return torch.empty(max(nbytes, self.chunk_bytes), dtype=torch.uint8)

    def _read_chunk(self, chunk: _Chunk, buffer: torch.Tensor) -> None:
        path, memory = self.root / chunk.relative_path, memoryview(buffer.numpy())
        for run in _runs(chunk.items):
            _read_run(path, run, memory)

    def consume(self, copy_out) -> None:
        """Calls copy_out(chunk, buffer) on each chunk as its bytes arrive, the last one first. The copies run
        on one thread: torch's parallel copy took the core the reading and hashing threads need (one thread
        loaded 7-12% faster in an A/B on two cores)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        read_buffers: dict[int, torch.Tensor] = {}  # by chunk index, until hashed
        hashing: deque = deque()
        next_to_hash = 0
        try:
            while self.pending:
                index, buffer, read = self.pending.popleft()
                read.result()
                self._read_next()
                read_buffers[index] = buffer
                # One hashing thread takes the chunks in file order, beside the copies.
                while next_to_hash in read_buffers:
                    chunk = self.chunks[next_to_hash]
                    hasher = self.hashers.get(chunk.relative_path)
                    hashing.append(
                        (self.hashing.submit(_hash, chunk, read_buffers[next_to_hash], hasher), next_to_hash)
                    )
                    next_to_hash += 1
                copy_out(self.chunks[index], buffer)
                # Every chunk handed to the hasher so far has been copied out: its buffer is free once hashed.
                while hashing:
                    hashed, hashed_index = hashing.popleft()
                    hashed.result()
                    self.free.append(read_buffers.pop(hashed_index))
        finally:
            torch.set_num_threads(threads)
            self.close()

    def checksums(self) -> dict[str, str]:
        return {name: hasher.hexdigest() for name, hasher in self.hashers.items()}

    def close(self) -> None:
        for _, _, read in self.pending:
            read.cancel()
        self.pending.clear()
        self.reader.shutdown()
        self.hashing.shutdown()


class StreamingReader(FileSystemReader):
    def __init__(self, path, chunk_bytes: int = CHUNK_BYTES):
        super().__init__(path)
        self.chunk_bytes = chunk_bytes
        self.checksums: dict[str, str] = {}  # of each file read whole, as meta.json records them
        self._started: tuple[list[MetadataIndex], _Stream] | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with open(path, "rb") as file:
            try:
                metadata = load_metadata(file)
            except pickle.UnpicklingError as error:
                raise ValueError(f"{path}: {error}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """The reads start here, with this rank's plan: they overlap DCP's exchange of the plans between ranks
        (about a tenth of a 1 GB load). read_data takes them over when its plan is the same."""
        plan = super().prepare_local_plan(plan)
        stream = self._stream(plan)
        if stream is not None:
            self._started = (_stored_items(plan), stream)
        return plan

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        started, self._started = self._started, None
        if started is not None and started[0] == _stored_items(plan):
            stream = started[1]
        else:
            if started is not None:
                started[1].close()
            stream = self._stream(plan)
        if stream is None:  # compressed or otherwise transformed items: DCP's own reader
            return super().read_data(plan, planner)
        stream.start(planner)
        stream.consume(lambda chunk, buffer: self._copy_out(chunk, buffer, planner))
        self.checksums = stream.checksums()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _stream(self, plan: LoadPlan) -> _Stream | None:
        items: dict[MetadataIndex, _Item] = {}
        for request in plan.items:
            info = self.storage_data[request.storage_index]
            if info.transform_descriptors:
                return None
            items.setdefault(request.storage_index, _Item(info)).requests.append(request)
        per_file: dict[str, list[_Item]] = {}
        for item in sorted(items.values(), key=lambda item: (item.info.relative_path, item.info.offset)):
            per_file.setdefault(item.info.relative_path, []).append(item)
        hashers = {
            name: new_digest() for name, file_items in per_file.items() if self._whole(name, file_items)
        }
        chunks = [chunk for name in per_file for chunk in self._chunks(name, per_file[name])]
        return _Stream(self.path, chunks, hashers)

    def _whole(self, name: str, file_items: list[_Item]) -> bool:
        """Whether the items cover the file from its first byte to its last, without a gap."""
        end = 0
        for item in file_items:
            if item.info.offset != end:
                return False
            end += item.info.length
        return end == os.stat(self.path / name).st_size

    def _chunks(self, name: str, file_items: list[_Item]) -> list[_Chunk]:
        chunks = [_Chunk(name, [], 0)]
        for item in file_items:
            if chunks[-1].items and chunks[-1].nbytes + _padded(item.info.length) > self.chunk_bytes:
                chunks.append(_Chunk(name, [], 0))
            item.position = chunks[-1].nbytes
            chunks[-1].items.append(item)
            chunks[-1].nbytes += _padded(item.info.length)
        return chunks

    def _copy_out(self, chunk: _Chunk, buffer: torch.Tensor, planner: LoadPlanner) -> None:
        for item in chunk.items:
            if item.placed is not None:
                planner.commit_tensor(item.requests[0], item.target)
                continue
            archive = buffer[item.position : item.position + item.info.length]
            tensor = None
            for request in item.requests:
                try:
                    if request.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(request, io.BytesIO(archive.numpy().tobytes()))
                        continue
                    if tensor is None:
                        tensor = saved_object(archive)
                    source = narrow_tensor_by_index(tensor, request.storage_offsets, request.lengths)
                    target = planner.resolve_tensor(request).detach()
                    if target.size() != source.size():
                        raise ValueError(
                            f"holds shape {tuple(source.size())}, {tuple(target.size())} expected"
                        )
                    target.copy_(source)
                    planner.commit_tensor(request, target)
                except Exception as error:
                    raise ValueError(
                        f"{self.path / chunk.relative_path}: item {request.storage_index.fqn} at byte "
                        f"{item.info.offset:,}: {error}"
                    ) from error
