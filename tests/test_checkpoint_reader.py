"""The checkpoint layer on a small model in one process: round trips, async saves, integrity errors and the
safe load's refusals."""

import json
import os
import pickle
import shutil
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter

from bigscience_train.checkpoint import integrity
from bigscience_train.checkpoint.dcp import CheckpointManager, SingleProcess, TrainState
from bigscience_train.checkpoint.integrity import CheckpointIntegrityError, file_checksum, share, writer_rank
from bigscience_train.checkpoint.safe_load import SafeReader, UnsafeCheckpointError, safe_dcp_load


class Planted:
    """A pickle that runs a shell command when unpickled: what a malicious checkpoint could carry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    step(model, optimizer)
    return model, optimizer


def step(model, optimizer) -> None:
    model(torch.randn(4, 16)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def weights(model) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values()]


@pytest.mark.parametrize(("threads", "async_save"), [(1, False), (2, False), (2, True)])
def test_a_round_trip_restores_weights_optimizer_rng_and_state_and_records_every_file(
    tmp_path, threads, async_save
):
    model, optimizer = model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, SingleProcess(), async_save=async_save, write_threads=threads)
    saved, saved_optim = weights(model), [t.clone() for t in optimizer_tensors(optimizer)]
    state = TrainState(step=3, consumed_samples=12, consumed_tokens=768, loss_scaler={"scale": 2.0})
    path = manager.save(model, optimizer, state, "model: tiny\n", {"model": "tiny"})
    after_save = torch.rand(1)
    manager.finish()
    assert manager.latest() == path and not list(tmp_path.glob(".tmp_*"))

    meta = json.loads((path / "meta.json").read_text())
    files = sorted(p.name for p in path.iterdir() if p.name != "meta.json")
    assert len([f for f in files if f.endswith(".distcp")]) == threads and ".metadata" in files
    assert meta["checksums"] == {name: file_checksum(path / name) for name in files}
    assert meta["shards"] == {name: (path / name).stat().st_size for name in files}
    assert meta["async"] is async_save and meta["step"] == 3 and meta["model"] == "tiny"

    other, other_optimizer = model_and_optimizer(1)
    other_optimizer.param_groups[0]["lr"] = 0.5
    assert not same(weights(other), saved)
    assert manager.load(path, other, other_optimizer) == state
    assert same(weights(other), saved)
    assert all(
        torch.equal(a, b) for a, b in zip(optimizer_tensors(other_optimizer), saved_optim, strict=True)
    )
    assert other_optimizer.param_groups[0]["lr"] == 1e-2
    assert other_optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert torch.equal(torch.rand(1), after_save)  # the RNG as it was when saved

    fresh = model_and_optimizer(2)[0]
    manager.load_weights(path, fresh)
    assert same(weights(fresh), saved)


def test_an_async_save_returns_before_its_bytes_are_written_and_keeps_the_state_it_was_given(
    tmp_path, monkeypatch
):
    """Training goes on while the shards are written; the optimizer steps once the copy is taken, and the
    checkpoint holds the state at save(), not the state the steps after it made."""
    write_data, release = FileSystemWriter.write_data, threading.Event()

    def held(self, *args, **kwargs):
        assert release.wait(60)
        return write_data(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", held)
    model, optimizer = model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, SingleProcess(), async_save=True)
    saved = weights(model)
    path = manager.save(model, optimizer, TrainState(step=1), "", {})
    manager.wait_staged()
    for _ in range(2):
        step(model, optimizer)
    assert not same(weights(model), saved)
    assert not path.exists() and manager.latest() is None
    release.set()
    assert manager.finish() == path and manager.latest() == path
    loaded = model_and_optimizer(1)
    manager.load(path, *loaded)
    assert same(weights(loaded[0]), saved)

    # The next save commits the one before it; retention keeps the last.
    retained = CheckpointManager(tmp_path, SingleProcess(), keep_last=1, async_save=True)
    for number in (2, 3):
        retained.save(model, optimizer, TrainState(step=number), "", {})
        step(model, optimizer)
    assert retained.latest().name == "step_0000002"
    retained.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000003"]


@pytest.fixture
def checkpoint(tmp_path):
    model, optimizer = model_and_optimizer(0)
    manager = CheckpointManager(tmp_path / "checkpoints", SingleProcess())
    return manager, manager.save(model, optimizer, TrainState(step=1), "", {})


def test_a_truncated_or_damaged_shard_is_named_before_anything_is_used(checkpoint):
    manager, path = checkpoint
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    model, optimizer = model_and_optimizer(1)
    before = weights(model)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(
        CheckpointIntegrityError, match=rf"{shard}: {len(data) - 10:,} bytes, meta.json records"
    ):
        manager.load(path, model, optimizer)
    assert same(weights(model), before)  # refused before DCP read anything
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=rf"{shard}: checksum"):
        manager.load(path, model, optimizer)
    (path / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointIntegrityError, match=r"rank_00000.pt: missing"):
        manager.load_weights(path, model)


def test_a_damaged_metadata_file_is_named(checkpoint):
    manager, path = checkpoint
    metadata = path / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointIntegrityError, match=rf"{metadata}: checksum"):
        manager.load(path, *model_and_optimizer(1))


def test_a_metadata_file_carrying_code_is_refused_not_run(checkpoint, tmp_path):
    manager, path = checkpoint
    planted = tmp_path / "planted"
    (path / ".metadata").write_bytes(pickle.dumps(Planted(planted)))
    with pytest.raises(UnsafeCheckpointError, match=rf"{path / '.metadata'}: refused: it needs posix.system"):
        SafeReader(path).read_metadata()
    # Through the manager too, whatever meta.json says of the file.
    model, optimizer = model_and_optimizer(1)
    with pytest.raises((UnsafeCheckpointError, CheckpointIntegrityError)):
        manager.load(path, model, optimizer)
    assert not planted.exists()
    # DCP's own reader runs it (then fails on what it returned).
    with pytest.raises(AttributeError):
        FileSystemReader(path).read_metadata()
    assert planted.exists()


def test_metadata_of_allowed_types_that_is_not_dcp_metadata_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(torch.Size([2, 3])))
    with pytest.raises(UnsafeCheckpointError, match="holds a Size, not DCP metadata"):
        SafeReader(tmp_path).read_metadata()


def test_a_checkpoint_item_carrying_code_is_refused_not_run(tmp_path):
    planted = tmp_path / "planted"
    path = tmp_path / "ckpt"
    dcp.save({"w": torch.ones(3), "extra": Planted(planted)}, checkpoint_id=path, no_dist=True)
    into = {"w": torch.zeros(3), "extra": None}
    with pytest.raises(
        UnsafeCheckpointError, match=rf"{path / '__0_0.distcp'}: item extra refused: it needs posix"
    ):
        safe_dcp_load(into, SafeReader(path), no_dist=True)
    assert not planted.exists() and into["extra"] is None
    # DCP's own planner runs it.
    dcp.load(into, storage_reader=FileSystemReader(path), planner=DefaultLoadPlanner(), no_dist=True)
    assert planted.exists()


def test_the_safe_load_reads_what_dcps_own_load_reads(tmp_path):
    generator = torch.Generator().manual_seed(0)
    saved = {
        "a": torch.randn(64, 48, generator=generator),
        "b": torch.randn(1000, generator=generator).to(torch.bfloat16),
        "settings": {"lr": 0.1, "betas": (0.9, 0.95), "fused": None, "name": "adamw"},
        "nested": {"c": torch.randn(7, 5, generator=generator).t().contiguous(), "steps": [1, 2]},
    }
    dcp.save(saved, checkpoint_id=tmp_path, no_dist=True)

    def empty():
        return {
            "a": torch.zeros(64, 48),
            "b": torch.zeros(1000, dtype=torch.bfloat16),
            "settings": dict.fromkeys(saved["settings"]),
            "nested": {"c": torch.zeros(5, 7), "steps": None},
        }

    ours, theirs = empty(), empty()
    safe_dcp_load(ours, SafeReader(tmp_path), no_dist=True)
    dcp.load(theirs, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    assert ours["settings"] == theirs["settings"] == saved["settings"]
    assert ours["nested"]["steps"] == theirs["nested"]["steps"] == [1, 2]
    for get in (lambda d: d["a"], lambda d: d["b"], lambda d: d["nested"]["c"]):
        assert torch.equal(get(ours), get(saved)) and torch.equal(get(theirs), get(saved))


@pytest.mark.parametrize("size", [0, 7, 100])
def test_a_file_is_hashed_through_one_open_in_pieces(tmp_path, monkeypatch, size):
    monkeypatch.setattr(integrity, "READ_BYTES", 7)
    opened = []

    def counted(*args, **kwargs):
        opened.append(args[0])
        return open(*args, **kwargs)  # noqa: SIM115 (the caller closes it)

    monkeypatch.setattr(integrity, "open", counted, raising=False)
    data = bytes(range(size))
    (tmp_path / "shard").write_bytes(data)
    assert file_checksum(tmp_path / "shard") == xxhash.xxh3_64(data).hexdigest()
    assert opened == [tmp_path / "shard"]


def test_hashing_is_shared_out_by_writer_and_by_rank():
    assert [writer_rank(n) for n in ("__0_0.distcp", "__12_3.distcp", ".metadata", "rank_00001.pt")] == [
        0,
        12,
        None,
        None,
    ]
    names = [f"f{i}" for i in range(7)]
    parts = [share(names, rank, 3) for rank in range(3)]
    assert sorted(n for part in parts for n in part) == names and all(parts)


def test_stale_temporary_directories_are_removed(tmp_path):
    manager = CheckpointManager(tmp_path, SingleProcess())
    (tmp_path / ".tmp_step_0000005").mkdir()
    (tmp_path / ".tmp_step_0000005" / "__0_0.distcp").write_bytes(b"partial")
    assert [p.name for p in manager.clean_incomplete()] == [".tmp_step_0000005"]
    assert not any(tmp_path.iterdir()) and manager.latest() is None
    shutil.rmtree(tmp_path)
    assert manager.clean_incomplete() == []
