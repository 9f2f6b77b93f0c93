"""Faults in real jobs on the two-node Slurm cluster of this machine (slurm/local_cluster.sh, the fixtures of
test_slurm_cluster): a rank that freezes mid-run (the hang watchdog ends the job, the chain resumes), and a
node that fails the health check at job start (excluded from the rest of the chain)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from bigscience_train.slurm.status import ACTIVE_STATES
from tests import test_slurm_cluster
from tests.test_slurm_cluster import (
    TRAIN,
    Budget,
    job_state,
    last_step,
    own_cache,
    submitted_job,
    wait_until_idle,
)
from tests.test_watchdog_health import COLLECTIVE_FRAME

# The local cluster, started (and stopped) as test_slurm_cluster does.
slurm_env = test_slurm_cluster.slurm_env
# Each test's own timeout (under pytest's 600 s); its waits end a minute before it.
FAULTS_TIMEOUT = 540
# The collective timeout of the hang test's jobs: the watchdog (hang_timeout 0.5 min) must end them first.
COLLECTIVE_MINUTES = 3


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """The process of training rank `rank` of the run (a torchrun worker: RANK in its environment)."""
    config = str(run_dir / "slurm" / "config.yaml")
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
            environ = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        worker = "bigscience_train.train" in argv and "torch.distributed.run" not in argv
        if worker and config in argv and f"RANK={rank}" in environ:
            return int(proc.name)
    return None


def submit_chain(budget: Budget, tiny_data: dict, run_dir: Path, *overrides: str) -> str:
    """A chain of two jobs of the cluster tests' small run, named after its directory; returns the array id."""
    args = [
        *TRAIN,
        *own_cache(tiny_data, run_dir),
        f"name={run_dir.name}",
        "cluster.chain_jobs=2",
        *overrides,
    ]
    return submitted_job(budget.bigscience("slurm", "submit", "--no-measure", *args, cwd=run_dir.parents[1]))


def job_log(run_dir: Path, array: str, task: int) -> str:
    (path,) = (run_dir / "slurm" / "logs").glob(f"*-{array}_{task}.out")
    return path.read_text()


@pytest.mark.timeout(FAULTS_TIMEOUT, func_only=True)
def test_a_frozen_rank_ends_its_job_by_the_watchdog_and_the_next_job_resumes(slurm_env, tiny_data, tmp_path):
    """Rank 3 is stopped with SIGSTOP mid-run: the three live ranks, blocked in collectives, write
    their stacks, rank 0 records the hang, the job ends well before the collective timeout, and the chain's
    second job resumes from `latest` and trains to the end."""
    run = tmp_path / "runs" / "hang"
    budget = Budget(FAULTS_TIMEOUT - 60, slurm_env, run)
    array = submit_chain(
        budget,
        tiny_data,
        run,
        "checkpoint.interval=3",
        "train.hang_timeout_minutes=0.5",
        f"parallel.timeout_minutes={COLLECTIVE_MINUTES}",
    )
    budget.wait(
        "a checkpoint and step 4", lambda: last_step(run) >= 4 and (run / "checkpoints" / "latest").exists()
    )
    os.kill(budget.wait("rank 3's process", lambda: rank_pid(run, 3)), signal.SIGSTOP)
    stopped = time.monotonic()
    budget.wait("the first job to end", lambda: job_state(budget, f"{array}_1") not in ACTIVE_STATES)
    assert time.monotonic() - stopped < COLLECTIVE_MINUTES * 60

    first = job_log(run, array, 1)
    assert first.count("hang watchdog: no training step finished") >= 3, first
    (job_dir,) = (run / "hangs").iterdir()
    for rank in (0, 1, 2):
        stacks = (job_dir / f"rank{rank}.txt").read_text()
        assert COLLECTIVE_FRAME.search(stacks), f"rank {rank}:\n{stacks}"
    hung = re.search(
        r"\[chain\] the job hung at step (\d+): .*; the next job of the chain resumes from checkpoint (step_\d+)",
        first,
    )
    assert hung, first

    status = wait_until_idle(budget, run, tmp_path)
    second = job_log(run, array, 2)
    assert f"resumed from {run / 'checkpoints' / hung.group(2)}" in second, second
    assert "[chain] training finished at step 30" in second, second
    assert json.loads((run / "last_stop.json").read_text())["reason"] == "iters"
    assert re.search(rf"{array}_1\s+FAILED", status) and re.search(rf"{array}_2\s+COMPLETED", status), status


@pytest.mark.timeout(FAULTS_TIMEOUT, func_only=True)
def test_a_node_failing_its_health_check_is_excluded_from_the_rest_of_the_chain(
    slurm_env, tiny_data, tmp_path
):
    """A chain of one-node jobs; BIGSCIENCE_HEALTH_FAULT=matmul@node1 (the health check's test hook) breaks
    node1's matmul, where Slurm places the first job of an idle cluster: the job names node1, writes it to
    RUN/slurm/excluded_nodes and stops before building the model; the rest of the chain is submitted again
    with --exclude=node1 (its pending task, queued before, would land on node1 again: cancelled) and trains on
    node2 to the end."""
    run = tmp_path / "runs" / "health"
    budget = Budget(FAULTS_TIMEOUT - 60, slurm_env, run)
    array = submit_chain(
        budget, tiny_data, run, "cluster.nodes=1", "+cluster.env.BIGSCIENCE_HEALTH_FAULT=matmul@node1"
    )
    status = wait_until_idle(budget, run, tmp_path)
    log = job_log(run, array, 1)
    assert re.search(
        r"node health: 1 node\(s\) \(node1\) checked in [\d.]+ s; all-reduce of 4,194,304 bytes over 2 "
        r"ranks in [\d.]+ s: [\d.e+]+ bytes/s",
        log,
    ), f"the first job ran on node1 (Slurm's first idle node)?\n{log}"
    failed = re.findall(r"node (\S+) failed the health check: (.*)", log)
    assert {node for node, _ in failed} == {"node1"}, log
    # Rank 0 names both ranks of the node.
    wrong = r"a 256x256 float32 matmul on cpu gave 1 of its 65536 entries different"
    assert any(re.search(rf"rank \d: {wrong}.*; rank \d: {wrong}", problems) for _, problems in failed), log
    assert "model gpt_tiny:" not in log
    assert (run / "slurm" / "excluded_nodes").read_text() == "node1\n"
    script = (run / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --exclude=node1\n" in script and "#SBATCH --array=2-2%1\n" in script
    assert "excluded nodes: node1 (later jobs are rendered with --exclude)" in log
    assert "cancelled the pending jobs" in log
    (resubmitted,) = [p for p in (run / "slurm" / "logs").glob("*_2.out") if f"-{array}_2" not in p.name]
    second = resubmitted.read_text()
    assert re.search(r"node health: 1 node\(s\) \(node2\) checked", second), second
    assert "[chain] training finished at step 30" in second, second
    assert json.loads((run / "last_stop.json").read_text())["reason"] == "iters"
    assert re.search(rf"{array}_1\s+FAILED", status) and re.search(r"_2\s+COMPLETED", status), status
