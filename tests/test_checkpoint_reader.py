"""The checkpoint reader: the same state as DCP's own reader, whole files hashed on the way, no code run."""

import dataclasses
import io
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from bigscience_train.checkpoint import file_reads, streaming_reader
from bigscience_train.checkpoint.integrity import file_checksum
from bigscience_train.checkpoint.reader import single_process_dcp
from bigscience_train.checkpoint.safe_load import SafeLoadPlanner
from bigscience_train.checkpoint.saved_object import ALIGNMENT, saved_object
from bigscience_train.checkpoint.streaming_reader import StreamingReader


def archive(obj, misalign: int = 0) -> torch.Tensor:
    """torch.save's bytes of `obj` in a uint8 tensor starting `misalign` bytes past an aligned address."""
    stream = io.BytesIO()
    torch.save(obj, stream)
    raw = stream.getvalue()
    buffer = torch.zeros(len(raw) + 2 * ALIGNMENT, dtype=torch.uint8)
    start = -buffer.data_ptr() % ALIGNMENT + misalign
    buffer[start : start + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return buffer[start : start + len(raw)]


SAVED_TENSORS = [
    torch.randn(3, 4),
    torch.randn(4, 3).t(),
    torch.arange(10.0)[3:6],
    torch.arange(6, dtype=torch.bfloat16),
    torch.zeros(0, 3),
    torch.tensor(2.5),
    torch.tensor([True, False]),
]


@pytest.mark.parametrize("tensor", SAVED_TENSORS, ids=lambda t: f"{t.dtype}{tuple(t.shape)}{t.stride()}")
def test_a_saved_tensor_is_read_as_a_view_of_the_archive(tensor):
    held = archive(tensor)
    loaded = saved_object(held)
    assert loaded.dtype == tensor.dtype and loaded.stride() == tensor.stride() and torch.equal(loaded, tensor)
    assert tensor.numel() == 0 or loaded.untyped_storage().data_ptr() == held.untyped_storage().data_ptr()
    # Misaligned bytes cannot be viewed as floats: copied, same values.
    assert torch.equal(saved_object(archive(tensor, misalign=1)), tensor)


@pytest.mark.parametrize(
    "value", [0.1, (0.9, 0.95), {"lr": 1e-4, "fused": None, "steps": [1, "x"]}, torch.Size([2])]
)
def test_saved_values_read_as_torch_load_reads_them(value):
    assert saved_object(archive(value)) == torch.load(io.BytesIO(archive(value).numpy()), weights_only=True)


class Planted:
    """A pickle that creates a file when unpickled: what a malicious checkpoint could carry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (type(self.path).touch, (self.path,))


def test_a_saved_object_carrying_code_is_refused(tmp_path):
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        saved_object(archive(Planted(tmp_path / "planted")))
    assert not (tmp_path / "planted").exists()


def state(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(64, 48, generator=generator),
        "b": torch.randn(1000, generator=generator).to(torch.bfloat16),
        "settings": {"lr": 0.1 * seed, "betas": (0.9, 0.95)},
        "c": torch.randn(7, 5, generator=generator).t().contiguous(),
    }


def load(into: dict, reader) -> dict:
    with single_process_dcp():
        dcp.load(into, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return into


@pytest.mark.parametrize(
    "chunk_bytes", [1, 4096, 64 << 20], ids=["item-per-chunk", "few-per-chunk", "one-chunk"]
)
def test_the_reader_loads_what_dcp_loads_and_hashes_whole_files(tmp_path, chunk_bytes):
    with single_process_dcp():
        dcp.save(state(1), checkpoint_id=tmp_path, no_dist=True)
    ours = StreamingReader(tmp_path, chunk_bytes=chunk_bytes)
    loaded = load(state(2), ours)
    reference = load(state(3), FileSystemReader(tmp_path))
    assert loaded["settings"] == reference["settings"] == {"lr": 0.1, "betas": (0.9, 0.95)}
    for key in ("a", "b", "c"):
        assert loaded[key].dtype == reference[key].dtype and torch.equal(loaded[key], reference[key])
    files = sorted(tmp_path.glob("*.distcp"))
    assert ours.checksums == {f.name: file_checksum(f) for f in files}

    # A part of a file is read without hashing it: the checksum check reads that file itself.
    partial = StreamingReader(tmp_path, chunk_bytes=chunk_bytes)
    only_b = load({"b": torch.zeros(1000, dtype=torch.bfloat16)}, partial)
    assert torch.equal(only_b["b"], reference["b"]) and partial.checksums == {}


def test_more_consecutive_items_than_one_preadv_takes(tmp_path):
    """Linux takes at most 1024 buffers per preadv: a run of 1500 small items is read in two calls."""
    saved = {f"t{i}": torch.full((3,), float(i)) for i in range(1500)}
    with single_process_dcp():
        dcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    loaded = load({key: torch.zeros(3) for key in saved}, StreamingReader(tmp_path))
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)


@pytest.mark.parametrize("lengths", [[], [5], [10, 0, 3, 10], [1] * 30, [25, 7, 40]])
def test_consecutive_views_are_cut_into_requests_of_bounded_size_and_count(monkeypatch, lengths):
    monkeypatch.setattr(file_reads, "REQUEST_BYTES", 10)
    monkeypatch.setattr(file_reads, "IOV_MAX", 4)
    data = bytearray(range(sum(lengths)))
    views, start = [], 0
    for length in lengths:
        views.append(memoryview(data)[start : start + length])
        start += length
    requests = list(file_reads.requests(views, 1000))
    offset = 1000
    for batch, at in requests:
        size = sum(len(view) for view in batch)
        assert at == offset and 0 < size <= 10 and len(batch) <= 4
        offset += size
    assert b"".join(bytes(view) for batch, _ in requests for view in batch) == bytes(data)


@pytest.mark.parametrize("size", [0, 7, 100])
def test_a_file_is_hashed_from_pieces_read_in_order(tmp_path, monkeypatch, size):
    monkeypatch.setattr(file_reads, "REQUEST_BYTES", 7)
    data = bytes(range(size))
    (tmp_path / "shard").write_bytes(data)
    assert file_checksum(tmp_path / "shard") == xxhash.xxh3_64(data).hexdigest()


class OnlyA(SafeLoadPlanner):
    """A final plan that differs from the local plan the reads started with."""

    def finish_plan(self, central_plan):
        return dataclasses.replace(
            central_plan, items=[item for item in central_plan.items if item.dest_index.fqn == "a"]
        )


@pytest.mark.parametrize("planner", [SafeLoadPlanner, OnlyA])
def test_reads_started_with_the_local_plan_serve_the_final_plan_only_when_it_is_the_same(tmp_path, planner):
    with single_process_dcp():
        dcp.save(state(1), checkpoint_id=tmp_path, no_dist=True)
    reader = StreamingReader(tmp_path)
    streams = []
    stream = reader._stream
    reader._stream = lambda plan: streams.append(len(plan.items)) or stream(plan)
    loaded = state(2)
    with single_process_dcp():
        dcp.load(loaded, storage_reader=reader, planner=planner(), no_dist=True)
    saved, untouched = state(1), state(2)
    assert torch.equal(loaded["a"], saved["a"])
    if planner is OnlyA:
        assert streams == [5, 1]  # the started reads dropped, the final plan's read
        assert torch.equal(loaded["c"], untouched["c"]) and loaded["settings"] == untouched["settings"]
    else:
        assert streams == [5]
        assert torch.equal(loaded["c"], saved["c"]) and loaded["settings"] == saved["settings"]


def test_a_truncated_shard_is_named(tmp_path):
    with single_process_dcp():
        dcp.save(state(1), checkpoint_id=tmp_path, no_dist=True)
    shard = next(tmp_path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    threads = torch.get_num_threads()
    with pytest.raises(CheckpointException) as raised:
        load(state(2), StreamingReader(tmp_path))
    assert f"{shard}: ends at byte" in str(raised.value.failures[0])
    assert torch.get_num_threads() == threads  # the copies' single thread given back


def test_a_metadata_file_carrying_code_is_refused_not_run(tmp_path):
    with single_process_dcp():
        dcp.save(state(1), checkpoint_id=tmp_path, no_dist=True)
    planted = tmp_path / "planted"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Planted(planted)))
    with pytest.raises(ValueError, match=r"\.metadata: refused pathlib\."):
        StreamingReader(tmp_path).read_metadata()
    assert not planted.exists()
    # DCP's own reader runs it (then fails on what it returned).
    with pytest.raises(AttributeError):
        FileSystemReader(tmp_path).read_metadata()
    assert planted.exists()


@pytest.mark.parametrize("reader", [StreamingReader, FileSystemReader])
def test_a_checkpoint_item_carrying_code_is_refused_not_run(tmp_path, reader):
    planted = tmp_path / "planted"
    with single_process_dcp():
        dcp.save(
            {"w": torch.ones(3), "extra": Planted(planted)}, checkpoint_id=tmp_path / "ckpt", no_dist=True
        )
    with pytest.raises(CheckpointException) as raised:
        load({"w": torch.zeros(3), "extra": None}, reader(tmp_path / "ckpt"))
    assert not planted.exists()
    assert "Unsupported global" in str(raised.value.failures[0])
    assert pickle.dumps(Planted(planted))  # the planted object is a real pickle


@pytest.mark.parametrize("numel", [4, 1 << 16], ids=["small-archive", "large-archive"])
def test_an_archive_in_the_other_byte_order_is_read_as_torch_load_reads_it(monkeypatch, numel):
    tensor = torch.arange(numel, dtype=torch.float32)
    with monkeypatch.context() as patched:
        patched.setattr("sys.byteorder", "big")  # what torch.save writes on a big-endian machine
        held = archive(tensor)
    expected = torch.load(io.BytesIO(held.numpy()), weights_only=True)
    assert not torch.equal(expected, tensor)  # the bytes were swapped, as the archive asks
    assert torch.equal(saved_object(held), expected)


@pytest.mark.parametrize(
    "request_bytes", [file_reads.REQUEST_BYTES, 1000], ids=["requests", "small-requests"]
)
@pytest.mark.parametrize("guess", ["right", "wrong"])
def test_large_tensors_are_read_into_their_destinations_and_hashed_there(
    tmp_path, monkeypatch, guess, request_bytes
):
    """Items of at least DIRECT_BYTES go straight into a destination that takes their bytes as they are; the
    rest, and an archive whose layout the first bytes did not tell right, are read into the buffer and copied.
    Requests smaller than an item cut it, and the bytes before and after its tensor's, anywhere."""
    generator = torch.Generator().manual_seed(0)
    saved = {
        "whole": torch.randn(64, 48, generator=generator),
        "half": torch.randn(3000, generator=generator).to(torch.bfloat16),
        "strided": torch.randn(40, 30, generator=generator).t(),  # saved with its strides: not read in place
        "into_strided": torch.randn(30, 40, generator=generator),
        "other_dtype": torch.randn(500, generator=generator),
        "small": torch.randn(3, generator=generator),
    }
    with single_process_dcp():
        dcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    monkeypatch.setattr(streaming_reader, "DIRECT_BYTES", 1024)
    monkeypatch.setattr(streaming_reader, "ARCHIVE_HEAD", 1024)  # the tail of each head lands in its target
    monkeypatch.setattr(file_reads, "REQUEST_BYTES", request_bytes)
    guessed = streaming_reader.tensor_record_start
    if guess == "wrong":
        monkeypatch.setattr(streaming_reader, "tensor_record_start", lambda head: guessed(head) + ALIGNMENT)
    placed = []
    confirm = streaming_reader._confirm
    monkeypatch.setattr(
        streaming_reader, "_confirm", lambda item, region: placed.append(confirm(item, region)) or placed[-1]
    )
    into = {
        "whole": torch.zeros(64, 48),
        "half": torch.zeros(3000, dtype=torch.bfloat16),
        "strided": torch.zeros(30, 40),
        "into_strided": torch.zeros(40, 30).t(),
        "other_dtype": torch.zeros(500, dtype=torch.float64),
        "small": torch.zeros(3),
    }
    reader = StreamingReader(tmp_path, chunk_bytes=1)
    loaded = load(into, reader)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor.to(loaded[key].dtype)), key
    # Confirmed in place: "whole" and "half" (a right guess), not "strided" (saved strided); "into_strided"
    # (destination strided), "other_dtype" (DCP converts it) and "small" were not tried.
    assert sorted(placed) == ([False, True, True] if guess == "right" else [False, False, False])
    files = sorted(tmp_path.glob("*.distcp"))
    assert reader.checksums == {f.name: file_checksum(f) for f in files}
