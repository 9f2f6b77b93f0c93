"""The node health check at job start (cluster.health_check), before the model is built: the job trains only
on nodes that pass. A failing node is named in the log and added to RUN/slurm/excluded_nodes, rank 0 records
the stop in last_stop.json (reason `health`), and every rank exits, so that the next job of the chain is
submitted without the node (slurm/chain.py)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from bigscience_train.checkpoint.paths import latest_checkpoint
from bigscience_train.excluded_nodes import add_excluded_nodes, excluded_nodes_path
from bigscience_train.last_stop import write_last_stop
from bigscience_train.parallel.env import ParallelEnv
from bigscience_train.parallel.health import HealthResult, check_job
from bigscience_train.parallel.precision import TORCH_DTYPES

# The exit status of a rank whose job failed the health check.
HEALTH_EXIT_CODE = 3


def node_name() -> str:
    """The node as the scheduler names it (what sbatch --exclude takes), else its hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def health_summary(result: HealthResult, world_size: int) -> str:
    nodes = f"{len(result.nodes)} node(s) ({', '.join(result.nodes)})"
    line = f"node health: {nodes} checked in {result.seconds:.2f} s"
    bandwidth = result.bandwidth(world_size)
    if bandwidth is not None:
        line += (
            f"; all-reduce of {result.allreduce_bytes:,} bytes over {world_size} ranks in "
            f"{result.allreduce_seconds:.4f} s: {bandwidth[0]:.4g} bytes/s "
            f"(bus bandwidth {bandwidth[1]:.4g} bytes/s)"
        )
    return line


def _record_failure(run_dir: Path, result: HealthResult, message: str) -> None:
    excluded = add_excluded_nodes(run_dir, list(result.failing))
    step = tokens = 0
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is not None:
        state = json.loads((latest / "train_state.json").read_text())
        step, tokens = state["step"], state["consumed_tokens"]
    write_last_stop(run_dir, "health", step, tokens, latest.name if latest else None, error=message)
    if excluded:
        print(f"excluded nodes of the run ({excluded_nodes_path(run_dir)}): {', '.join(excluded)}")


def check_nodes(cfg, penv: ParallelEnv) -> None:
    """Returns when every node passed; otherwise records the failure and ends the process (a collective that
    timed out may still hold a thread: os._exit)."""
    node = node_name()
    result = check_job(
        penv.rank,
        penv.world_size,
        node,
        penv.device,
        TORCH_DTYPES[cfg.precision.dtype.value],
        cfg.cluster.health_timeout_seconds,
    )
    if penv.is_rank0:
        print(health_summary(result, penv.world_size), flush=True)
    if result.ok:
        return
    lines = [f"node {n} failed the health check: {'; '.join(p)}" for n, p in result.failing.items()]
    lines += [f"the job failed the health check: {p}" for p in result.job_problems]
    # Rank 0 names every node; a rank of a failing node names its own too, in case rank 0 cannot.
    if penv.is_rank0:
        print("\n".join(lines))
        _record_failure(Path(cfg.run_dir), result, "; ".join(lines))
    elif node in result.failing:
        print(f"node {node} failed the health check: {'; '.join(result.failing[node])}")
    print(f"rank {penv.rank} on {node}: exiting, the job does not train", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(HEALTH_EXIT_CODE)
