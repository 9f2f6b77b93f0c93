"""Save and load RUN/checkpoints/step_NNNNNNN/ with DCP.

Commit protocol: every rank writes its shards into a hidden temporary directory; after a barrier rank 0
writes meta.json, renames the directory to its final name and then atomically replaces the `latest` file.
A process killed at any moment leaves the previous `latest` intact; temporary directories are ignored,
reported and cleaned at the next start.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.utils._pytree import tree_leaves

from bigscience_train.checkpoint.integrity import (
    CheckpointIntegrityError,
    checksums,
    file_record,
    problems,
    share,
)
from bigscience_train.checkpoint.paths import LATEST, committed_steps, latest_checkpoint, step_dir_name
from bigscience_train.checkpoint.reader import single_process_dcp
from bigscience_train.checkpoint.safe_load import SafeLoadPlanner
from bigscience_train.checkpoint.shard_writer import SHARD_SUFFIX, ShardWriter
from bigscience_train.checkpoint.streaming_reader import StreamingReader, collector_paused
from bigscience_train.fsutil import atomic_write_text
from bigscience_train.parallel.tensor import local_tensor

TMP_PREFIX = ".tmp_"


@dataclass
class TrainState:
    """Everything beyond weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    loss_scaler: dict = field(default_factory=dict)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), py[-1] or None))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def steps_to_delete(steps: list[int], keep_last: int | None, keep_every: int | None) -> list[int]:
    keep = set(steps if keep_last is None else steps[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return [s for s in steps if s not in keep]


@dataclass
class _PendingSave:
    """A save whose shards are still being written (async), committed by `finish()`."""

    future: Future | None
    # Done once the state is copied aside (async): the weights and optimizer state may change from then on.
    staged: Future | None
    tmp: Path
    final: Path
    meta: dict
    start: float
    writer: ShardWriter


# Optimizer state and param-group settings keyed by parameter name ("state.<name>.exp_avg",
# "param_groups.<name>.lr"): a pipeline stage finds its own parameters' entries, whatever layout saved them.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def rename_optim_state(optim_sd: dict, aliases: dict[str, str]) -> dict:
    """The flattened optimizer state dict with parameter names replaced per `aliases`."""
    if not aliases:
        return optim_sd
    renamed = {}
    for key, value in optim_sd.items():
        section, _, rest = key.partition(".")
        for old, new in aliases.items():
            if rest.startswith(old + "."):
                key = f"{section}.{new}{rest[len(old) :]}"
        renamed[key] = value
    return renamed


class BackgroundStager:
    """Copies the state aside on a background thread into buffers kept from one async save to the next (pinned
    where there is CUDA), then writes the copy there: the training step goes on meanwhile, and only the next
    change of the weights or optimizer state waits for the copy (CheckpointManager.wait_staged). After the
    first save a copy is a plain copy, without allocating and faulting in gigabytes each time; `allocate` does
    that before the first save, in the background too. On a GPU the copy runs on the device's default stream,
    in order with the training kernels."""

    def __init__(self):
        self._cache: dict | None = None
        self.allocated = False  # buffers allocated, or their allocation queued
        # One thread: the allocation, then each save's copy and its write, in the order of the saves.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")

    def allocate(self, state_dict: dict) -> Future:
        """Allocates buffers for a state dict of `state_dict`'s layout and touches every page of them."""
        self.allocated = True
        return self._thread.submit(self._allocate, state_dict)

    def _allocate(self, state_dict: dict) -> None:
        self._cache = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        for leaf in tree_leaves(self._cache):
            if isinstance(leaf, torch.Tensor):
                local_tensor(leaf).zero_()

    def _copy(self, state_dict: dict) -> dict:
        if self._cache is None:
            self._allocate(state_dict)
        return _copy_state_dict(state_dict, self._cache)

    def save(self, state_dict: dict, write) -> tuple[Future, Future]:
        """(the copy's future, the future of `write` called with the copy)."""
        self.allocated = True  # by the copy, if not before
        staged = self._thread.submit(self._copy, state_dict)
        written = self._thread.submit(lambda: write(staged.result()))
        return staged, written


class CheckpointManager:
    def __init__(
        self,
        root: Path,
        penv,
        keep_last: int | None = None,
        keep_every: int | None = None,
        async_save: bool = False,
        optim_aliases: dict[str, str] | None = None,
        write_threads: int = 2,
    ):
        self.root = Path(root)
        self.penv = penv
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_save = async_save
        self.write_threads = write_threads
        # Parameter names whose optimizer state is stored under another name (a pipeline's tied copy).
        self.optim_aliases = optim_aliases or {}
        self._pending: _PendingSave | None = None
        self._stager = BackgroundStager() if async_save else None
        self._background_group = None

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def clean_incomplete(self) -> list[Path]:
        """Temporary directories of interrupted saves: reported and removed by rank 0."""
        stale = sorted(self.root.glob(f"{TMP_PREFIX}*")) if self.root.is_dir() else []
        if self.penv.is_rank0:
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
        self.penv.barrier()
        return stale

    def save(self, model, optimizer, state: TrainState, config_yaml: str, metadata: dict) -> Path:
        """Writes RUN/checkpoints/step_N/. Synchronous: committed on return. Async: returns once the state is
        copied aside (training may change it then); the shards are written in the background and the step is
        committed by the next save or by finish()."""
        self.finish()
        name = step_dir_name(state.step)
        final, tmp = self.root / name, self.root / f"{TMP_PREFIX}{name}"
        start = time.perf_counter()
        if self.penv.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.penv.barrier()
        state_dict = self._state_dict(model, optimizer)
        future = None
        writer = ShardWriter(tmp, thread_count=self.write_threads)
        staged = None
        if self.async_save:
            group = self._async_group()
            staged, future = self._stager.save(state_dict, lambda copy: self._write(copy, writer, group))
        else:
            self._write(state_dict, writer)
        torch.save({"rng": rng_state()}, tmp / f"rank_{self.penv.rank:05d}.pt")
        if self.penv.is_rank0:
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=2))
        self._pending = _PendingSave(future, staged, tmp, final, {**metadata, **asdict(state)}, start, writer)
        if not self.async_save:
            self.finish()
        return final

    def _state_dict(self, model, optimizer) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
        return {"model": model_sd, "optim": rename_optim_state(optim_sd, self.optim_aliases)}

    def prepare(self, model, optimizer) -> Future | None:
        """Async saves: allocates the buffers of the state's copy in the background, once, so that the first save
        waits no longer than the next ones. Call it when the optimizer state exists (after an optimizer step).
        The allocation's future, or None if there is nothing to allocate."""
        if self._stager is None or self._stager.allocated:
            return None
        return self._stager.allocate(self._state_dict(model, optimizer))

    def wait_staged(self) -> None:
        """Returns once the last async save has copied the state aside: call it before changing the weights or
        the optimizer state (the optimizer step, a load)."""
        if self._pending is not None and self._pending.staged is not None:
            self._pending.staged.result()

    def _async_group(self):
        """The group background writes coordinate over: gloo, apart from the training collectives (one group
        used from two threads at once is unsafe), also on GPUs, whose default group is NCCL; none for one process,
        which exchanges nothing."""
        if self.penv.world_size == 1:
            return None
        if self._background_group is None:
            import torch.distributed as dist

            self._background_group = dist.new_group(backend="gloo")
        return self._background_group

    def _write(self, state_dict: dict, writer: ShardWriter, process_group=None) -> None:
        # One process exchanges no plans: DCP's gather and scatter of them would still pickle every item (0.05-0.08 s
        # of a 1.1 GB save).
        with single_process_dcp():
            dcp.save(
                state_dict,
                storage_writer=writer,
                process_group=process_group,
                no_dist=self.penv.world_size == 1,
            )

    def finish(self) -> Path | None:
        """Waits for a save still being written and commits it: checksums, meta.json, rename, `latest`,
        retention. Every rank calls it at the same point."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.future is not None:
            pending.future.result()
        tmp = pending.tmp
        self.penv.barrier()
        names = [p.name for p in tmp.iterdir() if p.is_file()]
        # Each rank's shard files were hashed as its writer wrote them (those it could not are read back here);
        # the other files are shared out.
        written = pending.writer.checksums
        others = [n for n in names if not n.endswith(SHARD_SUFFIX)]
        unhashed = [n for n, c in written.items() if c is None] + share(
            others, self.penv.rank, self.penv.world_size
        )
        mine = {**{n: c for n, c in written.items() if c is not None}, **checksums(tmp, unhashed)}
        hashed = {k: v for part in self.penv.all_gather_object(mine) for k, v in part.items()}
        if self.penv.is_rank0:
            meta = {
                **pending.meta,
                **file_record(tmp, names, hashed),
                "save_seconds": time.perf_counter() - pending.start,
                "async": pending.future is not None,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            if pending.final.exists():
                shutil.rmtree(pending.final)
            tmp.rename(pending.final)
            atomic_write_text(self.root / LATEST, pending.final.name + "\n")
            for step in steps_to_delete(committed_steps(self.root), self.keep_last, self.keep_every):
                shutil.rmtree(self.root / step_dir_name(step))
        self.penv.barrier()
        return pending.final

    def verify(self, path: Path, hash_files: bool = True, hashed: dict[str, str] | None = None) -> None:
        """Sizes of every file and (hash_files) checksums: those `hashed` by any rank as they are, this rank's
        share of the others from disk; every rank raises the same error."""
        if hashed is not None:
            hashed = {k: v for part in self.penv.all_gather_object(hashed) for k, v in part.items()}
        found = problems(path, self.penv.rank, self.penv.world_size, hash_files, hashed)
        every = sorted({p for part in self.penv.all_gather_object(found) for p in part})
        if every:
            raise CheckpointIntegrityError(path, every)

    def _read(self, path: Path, to_load: dict) -> None:
        """DCP load of `to_load` in place, between two checks: sizes before (a truncated shard must not reach
        DCP), checksums after: the reader hashes the files it reads whole as they go by, and the rest are
        hashed from disk. A damaged file raises before training can use anything read from it, also when DCP
        itself failed on it."""
        self.verify(path, hash_files=False)
        reader = StreamingReader(path)
        # One process has no plans to exchange: DCP's gather and scatter of them still pickle every item
        # (0.05 s, up to 0.2 s on a process's first load while the reads contend for the cores).
        try:
            with single_process_dcp():
                dcp.load(
                    to_load,
                    storage_reader=reader,
                    planner=SafeLoadPlanner(),
                    no_dist=self.penv.world_size == 1,
                )
        except BaseException:
            self.verify(path)
            raise
        self.verify(path, hashed=reader.checksums)

    @collector_paused()
    def load(self, path: Path, model, optimizer) -> TrainState:
        """Everything: weights, optimizer, RNG and train state, resharded to this process's layout."""
        self.wait_staged()
        if json.loads((path / "meta.json").read_text()).get("weights_only"):
            raise ValueError(f"{path} holds weights only (an import): load it with train.finetune=true")
        to_load = self._state_dict(model, optimizer)
        self._read(path, to_load)
        optim_sd = rename_optim_state(to_load["optim"], {v: k for k, v in self.optim_aliases.items()})
        set_state_dict(
            model, optimizer, model_state_dict=to_load["model"], optim_state_dict=optim_sd, options=OPTIONS
        )
        rank_file = path / f"rank_{self.penv.rank:05d}.pt"
        if rank_file.is_file():
            set_rng_state(torch.load(rank_file, weights_only=True)["rng"])
        return TrainState(**json.loads((path / "train_state.json").read_text()))

    @collector_paused()
    def load_weights(self, path: Path, model) -> None:
        """The model's weights alone (fine-tuning, evaluation), resharded to the model's layout."""
        self.wait_staged()
        model_sd = get_model_state_dict(model)
        to_load = {"model": model_sd}
        self._read(path, to_load)
        set_model_state_dict(model, to_load["model"])
