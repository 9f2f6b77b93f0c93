"""Our checkpoint save and load against bare DCP on the same state dict, in the same run.

State: a stack of 8 MLP blocks (1024 -> 4096 -> 1024, 67M parameters) with AdamW's two moments, 0.8 GB
in fp32. Ours: CheckpointManager.save (stock DCP FileSystemWriter, then the xxh3 manifest and the
atomic commit), sync and async, and CheckpointManager.load (sizes, the safe reader and planner, checksums,
set_state_dict). The peer: what a plain DCP user writes, get_state_dict then dcp.save with a stock
FileSystemWriter of the same thread count (or dcp.async_save with the same DefaultStager options), and
get_state_dict, dcp.load with a stock FileSystemReader, set_state_dict. Ours and the peer's are timed in
turns, best of three, each load after the page cache of its files is dropped. Async: how long a training step
(forward, backward and AdamW on one batch) waits on a save started before it: the call itself and the wait
for the copy before the optimizer step, at the first save (staging buffers allocated) and the next ones.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from benchmarks.common import report
from bigscience_train.checkpoint.dcp import (
    OPTIONS,
    CheckpointManager,
    SingleProcess,
    TrainState,
    staging_options,
)
from bigscience_train.checkpoint.integrity import file_checksum

THREADS = 2  # checkpoint.write_threads' default
ROUNDS = 3
WIDTH, BLOCKS, BATCH = 1024, 8, 32


def drop_cache(directory: Path) -> None:
    """The whole page cache as root, else each file's pages (which a virtual disk may ignore)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    except OSError:
        pass
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Bench:
    def __init__(self, root: Path):
        torch.manual_seed(0)
        blocks = [
            torch.nn.Sequential(torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.GELU()) for _ in range(BLOCKS)
        ]
        layers = [layer for block in blocks for layer in (block, torch.nn.Linear(4 * WIDTH, WIDTH))]
        self.model = torch.nn.Sequential(*layers)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.inputs = torch.randn(BATCH, WIDTH)
        self.root = root
        self.count = 0
        self.ours = CheckpointManager(root / "ours", SingleProcess(), write_threads=THREADS)
        self.ours_async = CheckpointManager(
            root / "ours_async", SingleProcess(), async_save=True, write_threads=THREADS
        )
        self.stager = DefaultStager(staging_options())
        self.train_step(wait=lambda: None)

    def train_step(self, wait) -> float:
        """Seconds the step waited (`wait`) before its optimizer step."""
        self.model(self.inputs).square().mean().backward()
        waited = timed(wait)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return waited

    def fresh(self, kind: str) -> Path:
        self.count += 1
        return self.root / kind / f"step_{self.count:07d}"

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=OPTIONS)
        return {"model": model_sd, "optim": optim_sd}

    def our_save(self) -> Path:
        self.count += 1
        return self.ours.save(self.model, self.optimizer, TrainState(step=self.count), "", {})

    def peer_save(self) -> Path:
        path = self.fresh("peer")
        dcp.save(self.state_dict(), storage_writer=FileSystemWriter(path, thread_count=THREADS), no_dist=True)
        return path

    def our_load(self, path: Path) -> None:
        self.ours.load(path, self.model, self.optimizer)

    def peer_load(self, path: Path) -> None:
        state_dict = self.state_dict()
        dcp.load(state_dict, storage_reader=FileSystemReader(path), no_dist=True)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=OPTIONS,
        )

    def our_async(self) -> float:
        """Seconds the next training step is held by an async save started before it."""
        self.count += 1
        start = time.perf_counter()
        self.ours_async.save(self.model, self.optimizer, TrainState(step=self.count), "", {})
        blocked = time.perf_counter() - start + self.train_step(self.ours_async.wait_staged)
        self.ours_async.finish()
        return blocked

    def peer_async(self) -> float:
        writer = FileSystemWriter(self.fresh("peer_async"), thread_count=THREADS)
        start = time.perf_counter()
        response = dcp.async_save(
            self.state_dict(), storage_writer=writer, async_stager=self.stager, no_dist=True
        )
        blocked = time.perf_counter() - start + self.train_step(response.staging_completion.result)
        response.upload_completion.result()
        return blocked


def main() -> None:
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    try:
        bench = Bench(root)
        parameters = sum(p.numel() for p in bench.model.parameters())
        # Warm-up: the process's first DCP calls, and the first async save of each (staging buffers allocated).
        first_ours_async, first_peer_async = bench.our_async(), bench.peer_async()
        path, peer_path = bench.our_save(), bench.peer_save()
        size = sum(p.stat().st_size for p in path.iterdir())
        times: dict[str, list[float]] = {
            k: [] for k in ("save", "peer_save", "load", "peer_load", "hash", "async", "peer_async")
        }
        for _ in range(ROUNDS):
            times["save"].append(timed(bench.our_save))
            # What the manifest costs a save: its files hashed while still in the page cache.
            times["hash"].append(timed(lambda: [file_checksum(p) for p in bench.ours.latest().iterdir()]))
            times["peer_save"].append(timed(bench.peer_save))
            drop_cache(path)
            times["load"].append(timed(lambda: bench.our_load(path)))
            drop_cache(peer_path)
            times["peer_load"].append(timed(lambda: bench.peer_load(peer_path)))
            times["async"].append(bench.our_async())
            times["peer_async"].append(bench.peer_async())
        plain = min(timed(lambda: bench.train_step(lambda: None)) for _ in range(ROUNDS))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    figures = {
        "parameters": parameters,
        "checkpoint_bytes": size,
        "save_s": best["save"],
        "peer_save_s": best["peer_save"],
        "save_ours_over_peer_time": best["save"] / best["peer_save"],
        "load_s": best["load"],
        "peer_load_s": best["peer_load"],
        "load_ours_over_peer_time": best["load"] / best["peer_load"],
        "manifest_hash_s": best["hash"],
        "manifest_hash_over_peer_save_time": best["hash"] / best["peer_save"],
        "async_blocking_s": best["async"],
        "peer_async_blocking_s": best["peer_async"],
        "async_first_blocking_s": first_ours_async,
        "peer_async_first_blocking_s": first_peer_async,
        "train_step_s": plain,
    }
    report(
        "checkpoint_io",
        figures,
        {
            "save: DCP's time / ours (manifest and commit included)": {
                "value": best["peer_save"] / best["save"],
                "target": 0.8,
            },
            "load: DCP's time / ours (checks and safe load included)": {
                "value": best["peer_load"] / best["load"],
                "target": 0.8,
            },
            "async blocking: dcp.async_save's / ours": {
                "value": best["peer_async"] / best["async"],
                "target": 0.8,
            },
            "sync save / async blocking": {"value": best["save"] / best["async"], "target": 10.0},
            "sync save / first async blocking": {"value": best["save"] / first_ours_async, "target": 10.0},
        },
    )


if __name__ == "__main__":
    main()
