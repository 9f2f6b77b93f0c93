"""Save and load RUN/checkpoints/step_NNNNNNN/ with stock DCP.

DCP's FileSystemWriter and FileSystemReader carry the bytes, and dcp.async_save the async saves. Ours adds the
safe load (safe_load.py), the manifest (meta.json: sizes and xxh3 checksums of every file, integrity.py) and
the commit protocol: every rank writes its shards into a hidden temporary directory; after a barrier rank 0
writes meta.json, renames the directory to its final name and then atomically replaces the `latest` file.
A process killed at any moment leaves the previous `latest` intact; temporary directories are ignored,
reported and cleaned at the next start.

Async saves: DCP's DefaultStager copies the state aside on a thread of its own (into pinned buffers on a
GPU, on a stream of its own), into buffers it keeps from one save to the next, while the training step goes
on; only the next change of the weights or optimizer state waits for the copy (wait_staged). DCP's thread then
writes the copy, and a thread of ours hashes this rank's shards once they are written.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from bigscience_train.checkpoint.integrity import (
    CheckpointIntegrityError,
    checksums,
    file_record,
    problems,
    share,
    writer_rank,
)
from bigscience_train.checkpoint.paths import LATEST, committed_steps, latest_checkpoint, step_dir_name
from bigscience_train.checkpoint.safe_load import SafeReader, safe_dcp_load
from bigscience_train.fsutil import atomic_write_text

TMP_PREFIX = ".tmp_"


@dataclass
class TrainState:
    """Everything beyond weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    loss_scaler: dict = field(default_factory=dict)
    # The product of the LR scales rollbacks asked for (`bigscience ckpt rollback --lr-scale`).
    lr_scale: float = 1.0
    # Samples and tokens of the iterations train.skip_iterations skipped: consumed, but not counted by the LR
    # schedule (Megatron-DeepSpeed steps no LR scheduler for them).
    lr_skipped_samples: int = 0
    lr_skipped_tokens: int = 0


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


@runtime_checkable
class WholeState(Protocol):
    """A model with its optimizer whose state is read and written whole, by our parameter names, in the
    flattened layout get_state_dict gives (OPTIONS) instead of through it: DeepSpeed's engine
    (parallel/deepspeed_engine.py). Every rank takes part in both calls."""

    def full_state(self, optimizer: bool = True) -> dict: ...

    def set_full_state(self, state: dict) -> None: ...


class SingleProcess:
    """What CheckpointManager asks of the parallel environment, for one process outside a job."""

    rank, world_size, is_rank0 = 0, 1, True

    def barrier(self) -> None:
        pass

    def all_gather_object(self, obj) -> list:
        return [obj]


@dataclass
class _PendingSave:
    """A save whose shards may still be being written (async), committed by `finish()`."""

    tmp: Path
    final: Path
    meta: dict
    start: float
    # Async: done once the state is copied aside (the weights and optimizer state may change from then on),
    # and the checksums of this rank's shards, once they are written.
    staged: Future | None = None
    hashed: Future | None = None


def staging_options() -> StagingOptions:
    """Async saves copy the state on a thread of their own, into pinned memory with an accelerator."""
    accelerated = torch.accelerator.is_available()
    return StagingOptions(
        use_pinned_memory=accelerated,
        use_shared_memory=False,
        use_async_staging=True,
        use_non_blocking_copy=accelerated,
    )


def own_checksums(tmp: Path, rank: int) -> dict[str, str]:
    """Checksums of the shard files this rank wrote, read back while they are likely still in its page cache."""
    return checksums(tmp, [p.name for p in tmp.iterdir() if writer_rank(p.name) == rank])


def _hash_when_written(written: Future, tmp: Path, rank: int) -> dict[str, str]:
    written.result()
    return own_checksums(tmp, rank)


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
        self._stager: DefaultStager | None = None
        self._hashing: ThreadPoolExecutor | None = None
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
        """Writes RUN/checkpoints/step_N/. Synchronous: committed on return. Async: returns at once; the state
        is copied aside and written in the background, wait_staged() returns once the copy is done, and the
        step is committed by the next save or by finish()."""
        self.finish()
        name = step_dir_name(state.step)
        final, tmp = self.root / name, self.root / f"{TMP_PREFIX}{name}"
        start = time.perf_counter()
        if self.penv.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.penv.barrier()
        pending = _PendingSave(tmp, final, {**metadata, **asdict(state)}, start)
        state_dict = self._state_dict(model, optimizer)
        writer = FileSystemWriter(tmp, thread_count=self.write_threads)
        if self.async_save:
            pending.staged, pending.hashed = self._save_async(state_dict, writer, tmp)
        else:
            dcp.save(state_dict, storage_writer=writer, no_dist=self.penv.world_size == 1)
        torch.save({"rng": rng_state()}, tmp / f"rank_{self.penv.rank:05d}.pt")
        if self.penv.is_rank0:
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=2))
        self._pending = pending
        if not self.async_save:
            self.finish()
        return final

    def _state_dict(self, model, optimizer) -> dict:
        if isinstance(model, WholeState):
            return model.full_state()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
        return {"model": model_sd, "optim": rename_optim_state(optim_sd, self.optim_aliases)}

    def _save_async(self, state_dict: dict, writer: FileSystemWriter, tmp: Path) -> tuple[Future, Future]:
        """(the copy's future, the future of this rank's shard checksums once written)."""
        if self._stager is None:
            self._stager = DefaultStager(staging_options())
            self._hashing = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash")
        if torch.accelerator.is_available():
            # The copy runs on a stream of its own: the kernels of the last optimizer step must be done.
            torch.accelerator.synchronize()
        response = dcp.async_save(
            state_dict,
            storage_writer=writer,
            process_group=self._async_group(),
            async_checkpointer_type=AsyncCheckpointerType.THREAD,
            async_stager=self._stager,
            no_dist=self.penv.world_size == 1,
        )
        hashed = self._hashing.submit(_hash_when_written, response.upload_completion, tmp, self.penv.rank)
        return response.staging_completion, hashed

    def wait_staged(self) -> None:
        """Returns once the last async save has copied the state aside: call it before changing the weights or
        the optimizer state (the optimizer step, a load)."""
        if self._pending is not None and self._pending.staged is not None:
            self._pending.staged.result()

    def _async_group(self):
        """The gloo group background writes coordinate over, apart from the training collectives (one group
        used from two threads at once is unsafe): dcp.async_save asks for a CPU backend, also of one process
        on a GPU, whose default group is NCCL. None where torch.distributed is not initialized."""
        if not dist.is_initialized():
            return None
        if self._background_group is None:
            self._background_group = dist.new_group(backend="gloo")
        return self._background_group

    def finish(self) -> Path | None:
        """Waits for a save still being written and commits it: checksums, meta.json, rename, `latest`,
        retention. Every rank calls it at the same point."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        rank, world, tmp = self.penv.rank, self.penv.world_size, pending.tmp
        own = pending.hashed.result() if pending.hashed is not None else own_checksums(tmp, rank)
        self.penv.barrier()
        names = [p.name for p in tmp.iterdir() if p.is_file()]
        # Each rank hashed the shards it wrote; the files whose writer the name does not tell are shared out.
        others = share([n for n in names if writer_rank(n) is None], rank, world)
        mine = {**own, **checksums(tmp, others)}
        hashed = {k: v for part in self.penv.all_gather_object(mine) for k, v in part.items()}
        if self.penv.is_rank0:
            meta = {
                **pending.meta,
                **file_record(tmp, names, hashed),
                "save_seconds": time.perf_counter() - pending.start,
                "async": pending.hashed is not None,
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

    def verify(self, path: Path, hash_files: bool = True) -> None:
        """Sizes of every file and (hash_files) checksums, each rank hashing its share of the files; every rank
        raises the same error."""
        found = problems(path, self.penv.rank, self.penv.world_size, hash_files)
        every = sorted({p for part in self.penv.all_gather_object(found) for p in part})
        if every:
            raise CheckpointIntegrityError(path, every)

    def _read(self, path: Path, to_load: dict) -> None:
        """Safe DCP load of `to_load` in place, between two checks: sizes before (a truncated shard must not
        reach DCP), checksums after, read from disk. A damaged file raises before training can use anything
        read from it, also when DCP itself failed on it."""
        self.verify(path, hash_files=False)
        try:
            safe_dcp_load(to_load, SafeReader(path), no_dist=self.penv.world_size == 1)
        except (Exception, CheckpointException):
            self.verify(path)
            raise
        self.verify(path)

    def load(self, path: Path, model, optimizer) -> TrainState:
        """Everything: weights, optimizer, RNG and train state, resharded to this process's layout."""
        self.wait_staged()
        if json.loads((path / "meta.json").read_text()).get("weights_only"):
            raise ValueError(f"{path} holds weights only (an import): load it with train.finetune=true")
        to_load = self._state_dict(model, optimizer)
        if isinstance(model, WholeState):
            # Its param-group settings come from the run config: the other engine's may hold other keys.
            to_load["optim"] = {
                k: v for k, v in to_load["optim"].items() if not k.startswith("param_groups.")
            }
        self._read(path, to_load)
        if isinstance(model, WholeState):
            model.set_full_state(to_load)
        else:
            optim_sd = rename_optim_state(to_load["optim"], {v: k for k, v in self.optim_aliases.items()})
            set_state_dict(
                model,
                optimizer,
                model_state_dict=to_load["model"],
                optim_state_dict=optim_sd,
                options=OPTIONS,
            )
        rank_file = path / f"rank_{self.penv.rank:05d}.pt"
        if rank_file.is_file():
            set_rng_state(torch.load(rank_file, weights_only=True)["rng"])
        return TrainState(**json.loads((path / "train_state.json").read_text()))

    def load_weights(self, path: Path, model) -> None:
        """The model's weights alone (fine-tuning, evaluation), resharded to the model's layout."""
        self.wait_staged()
        if isinstance(model, WholeState):
            to_load = model.full_state(optimizer=False)
            self._read(path, to_load)
            model.set_full_state(to_load)
            return
        to_load = {"model": get_model_state_dict(model)}
        self._read(path, to_load)
        set_model_state_dict(model, to_load["model"])
