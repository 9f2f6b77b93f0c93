"""Node health at job start, before the model is built: every rank checks that its node shows the devices it
should (CUDA: one per rank on the node; nothing to check on CPU) and that a matmul gives the known product (on
CUDA in the training dtype), then the whole job joins one all-reduce, which must complete within a short
timeout and whose bandwidth is measured.

Ranks exchange their names and findings through the process group's store, not through collectives: a rank
that never arrives (a dead or unreachable node) cannot block the others past the timeout, and is named by
its absence. Every rank reaches the same verdict from the same store entries.

Test hook, documented and read by this module only: BIGSCIENCE_HEALTH_FAULT=KIND[@NODE[,NODE...]] makes
the named nodes (every node when none is named) fail as a broken one would. KIND is `matmul` (the product
comes out wrong) or `allreduce` (the node's ranks never join the all-reduce, as an unreachable node).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

FAULT_ENV = "BIGSCIENCE_HEALTH_FAULT"
FAULT_KINDS = ("matmul", "allreduce")
# Entries of the product of two {-1, 0, 1} matrices of this size are integers within +-256: exact in bf16
# (8 significant bits), fp16 and fp32, so any difference from the integer product is a wrong result.
MATMUL_SIZE = 256
ALLREDUCE_BYTES = {"cpu": 4 << 20, "cuda": 64 << 20}
_KEY = "bigscience_health"


@dataclass
class HealthResult:
    # Node -> the problems of its ranks ("rank R: ..."); empty when every node passed.
    failing: dict[str, list[str]] = field(default_factory=dict)
    # Problems no node can be blamed for: the all-reduce failed with every rank there, or a rank whose node
    # is unknown (it never gave its name) did not report.
    job_problems: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    allreduce_bytes: int = 0
    allreduce_seconds: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failing and not self.job_problems

    def bandwidth(self, world_size: int) -> tuple[float, float] | None:
        """(algorithm, bus) bandwidth of the all-reduce in bytes/s, as nccl-tests define them."""
        if not self.allreduce_seconds:
            return None
        algorithm = self.allreduce_bytes / self.allreduce_seconds
        return algorithm, algorithm * 2 * (world_size - 1) / max(world_size, 1)


def injected_fault(node: str, value: str | None = None) -> str | None:
    """The fault BIGSCIENCE_HEALTH_FAULT injects on `node`, if any."""
    value = os.environ.get(FAULT_ENV, "") if value is None else value
    if not value:
        return None
    kind, _, nodes = value.partition("@")
    if kind not in FAULT_KINDS:
        raise ValueError(f"{FAULT_ENV}={value!r}: the fault is one of {', '.join(FAULT_KINDS)}[@node,...]")
    return kind if not nodes or node in nodes.split(",") else None


def _operands(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two {-1, 0, 1} matrices in `dtype` on `device`, and their product computed in integers on the CPU."""
    i = torch.arange(MATMUL_SIZE)
    a = (i[:, None] * 7 + i[None, :] * 3) % 3 - 1
    b = (i[:, None] * 5 + i[None, :] * 11 + 1) % 3 - 1
    return a.to(device, dtype), b.to(device, dtype), a @ b


def local_problems(
    device: torch.device, dtype: torch.dtype, ranks_on_node: int, fault: str | None
) -> list[str]:
    """This rank's own checks: the node's devices and a matmul."""
    problems = []
    if device.type == "cuda" and torch.cuda.device_count() != ranks_on_node:
        problems.append(
            f"{torch.cuda.device_count()} CUDA devices visible for {ranks_on_node} ranks on the node"
        )
    a, b, expected = _operands(device, dtype)
    product = (a @ b).cpu()
    if fault == "matmul":
        product[0, 0] += 1
    wrong = (product.to(torch.int64) != expected).sum().item()
    if wrong:
        problems.append(
            f"a {MATMUL_SIZE}x{MATMUL_SIZE} {str(dtype).removeprefix('torch.')} matmul on {device} gave "
            f"{wrong} of its {MATMUL_SIZE**2} entries different from the known product"
        )
    return problems


def _left(deadline: float) -> timedelta:
    return timedelta(seconds=max(deadline - time.monotonic(), 0.001))


def _timed_all_reduce(
    device: torch.device, nbytes: int, world: int, deadline: float
) -> tuple[float, str | None]:
    """(seconds, problem) of an all-reduce of `nbytes`, after a small one that sets up the communicators."""
    for numel in (1, nbytes // 4):
        t = torch.ones(numel, dtype=torch.float32, device=device)
        start = time.perf_counter()
        try:
            dist.all_reduce(t, async_op=True).wait(timeout=_left(deadline))
        except RuntimeError as e:
            return 0.0, f"the all-reduce across the job did not complete in time ({e})"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if not bool((t == world).all()):
            return (
                seconds,
                f"an all-reduce of ones over {world} ranks gave {t.min().item()}..{t.max().item()}",
            )
    return seconds, None


def _store_wait(store, keys: list[str], deadline: float) -> set[str]:
    """Waits until the keys exist or the deadline passes; returns those still missing."""
    try:
        store.wait(keys, _left(deadline))
        return set()
    except RuntimeError:
        return {k for k in keys if not store.check([k])}


_checks_run = 0


def check_job(
    rank: int, world: int, node: str, device: torch.device, dtype: torch.dtype, timeout: float
) -> HealthResult:
    """Runs on every rank of the job at once. Every rank reads the same reports, so the ranks agree on the
    failing nodes; a rank that fails alone (its all-reduce timed out, the others' did not) still ends the job,
    as any rank that exits does under torchrun and srun --kill-on-bad-exit."""
    global _checks_run
    _checks_run += 1
    # Keys of their own for each check a process runs: a store outlives one check.
    key = f"bigscience_health/{_checks_run}"
    start = time.monotonic()
    deadline = start + timeout
    fault = injected_fault(node)
    # The process group's own store, which every rank reached to join the group.
    store = dist.distributed_c10d._get_default_store()
    result = HealthResult()
    named = [f"{key}/node/{r}" for r in range(world)]
    store.set(named[rank], node)
    unnamed = _store_wait(store, named, deadline)
    names = {r: store.get(k).decode() for r, k in enumerate(named) if k not in unnamed}
    problems = local_problems(device, dtype, sum(n == node for n in names.values()), fault)
    reports = [f"{key}/problems/{r}" for r in range(world)]
    all_reduce_problem = None
    if fault != "allreduce":
        # Reported before joining: a rank that is in the all-reduce has always reported.
        store.set(reports[rank], json.dumps(problems))
        result.allreduce_bytes = ALLREDUCE_BYTES[device.type]
        seconds, all_reduce_problem = _timed_all_reduce(device, result.allreduce_bytes, world, deadline)
        result.allreduce_seconds = None if all_reduce_problem else seconds
    # After a complete all-reduce every report is there or on its way: only a broken store could stop them.
    absent = _store_wait(store, reports, deadline if all_reduce_problem else time.monotonic() + timeout)
    for r in range(world):
        if reports[r] in absent:
            found = [f"rank {r} did not reach the all-reduce within {timeout:g} s"]
        else:
            found = [f"rank {r}: {p}" for p in json.loads(store.get(reports[r]))]
        if found and r in names:
            result.failing.setdefault(names[r], []).extend(found)
        elif found:
            result.job_problems += [f"{p} (its node gave no name)" for p in found]
    if all_reduce_problem and not result.failing:
        result.job_problems.append(all_reduce_problem)
    result.nodes = sorted(set(names.values()))
    result.seconds = time.monotonic() - start
    return result
