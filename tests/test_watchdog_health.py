"""The hang watchdog (train/watchdog.py) and the node health check at job start (parallel/health.py,
train/preflight.py), on this machine; tests/test_slurm_faults.py runs both in real Slurm jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from bigscience_train.config import config_problems, load_config
from bigscience_train.excluded_nodes import add_excluded_nodes, read_excluded_nodes
from bigscience_train.last_stop import write_last_stop
from bigscience_train.slurm.chain import decide
from bigscience_train.slurm.submit import prepare_training
from bigscience_train.train.preflight import HEALTH_EXIT_CODE
from bigscience_train.train.watchdog import HANG_EXIT_CODE
from tests.conftest import ROOT, child_env, data_overrides, run_cli, torchrun

# A frame of torch.distributed waiting for a collective, as faulthandler prints it.
COLLECTIVE_FRAME = re.compile(
    r"torch/distributed/\S+\", line \d+ in "
    r"(all_reduce|all_gather\w*|reduce_scatter\w*|broadcast\w*|barrier|wait_tensor|wait)\b"
)
TINY = [
    "model=gpt_tiny",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.eval_iters=0",
    "logging.log_interval=1",
]


def test_watchdog_fires_only_once_armed_writes_every_stack_and_exits(tmp_path):
    """A one-process run of the watchdog itself: unarmed before the first step, then a main thread stuck for
    longer than the timeout gets its stack written, on_hang called and the process ended with os._exit."""
    report, marker = tmp_path / "hangs" / "rank0.txt", tmp_path / "on_hang"
    code = """
import sys, threading, time
from pathlib import Path
from bigscience_train.train.watchdog import HangWatchdog
report, marker = Path(sys.argv[1]), Path(sys.argv[2])
watchdog = HangWatchdog(0.3, report, lambda step: marker.write_text(str(step)))
time.sleep(1.5)
print("unarmed: still running", flush=True)
watchdog.beat(7)
def stuck_in_a_collective():
    threading.Event().wait()
stuck_in_a_collective()
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(report), str(marker)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert done.returncode == HANG_EXIT_CODE, done.stderr
    assert "unarmed: still running" in done.stdout
    assert "hang watchdog: no training step finished" in done.stderr and "since step 7" in done.stderr
    text = report.read_text()
    assert "since step 7" in text and "hang-watchdog = 0x" in text and "MainThread = 0x" in text
    assert re.search(r"line \d+ in stuck_in_a_collective", text), text
    assert marker.read_text() == "7"
    assert not list(report.parent.glob(".*tmp*"))


def test_a_frozen_rank_leaves_the_live_one_stacks_in_its_collective_and_a_hang_stop(tiny_data, tmp_path):
    """Rank 1 stops itself (SIGSTOP) at step 4 of a TP2 run: rank 0 blocks in the step's collective, its
    watchdog writes its stacks, which name that collective, records the stop as `hang` at step 3 with
    step 2's checkpoint, and exits; a stopped rank writes nothing."""
    run, marker = tmp_path / "run", tmp_path / "frozen_pid"
    args = [
        *TINY,
        "parallel.tp=2",
        "train.iters=50",
        "checkpoint.interval=2",
        "train.hang_timeout_minutes=0.1",
        *data_overrides(tiny_data, run),
    ]
    env = child_env({"HANG_RANK": "1", "HANG_STEP": "4", "HANG_MARKER": str(marker)})
    job = subprocess.Popen(
        torchrun(2, [str(ROOT / "tests" / "hang_check.py"), *args]),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 400
    try:
        # The frozen rank cannot die of torchrun's SIGTERM: it goes once the live rank has written its stacks.
        while not list((run / "hangs").glob("*/rank0.txt")) and time.monotonic() < deadline:
            assert job.poll() is None, job.communicate()
            time.sleep(0.5)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        out, err = job.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        job.kill()
    assert job.returncode != 0
    assert "hang watchdog: no training step finished" in err and "since step 3" in err, err
    (reports,) = [p for p in (run / "hangs").iterdir()]
    assert sorted(p.name for p in reports.iterdir()) == ["rank0.txt"]
    text = (reports / "rank0.txt").read_text()
    assert COLLECTIVE_FRAME.search(text), text
    last = json.loads((run / "last_stop.json").read_text())
    assert last["reason"] == "hang" and last["step"] == 3 and last["checkpoint"] == "step_0000002", last
    assert str(reports) in last["error"]


def test_hang_timeout_must_be_under_the_collective_timeout():
    cfg = load_config(
        ["model=gpt_tiny", "train.iters=1", "train.hang_timeout_minutes=30", "parallel.timeout_minutes=30"]
    )
    (problem,) = [p for p in config_problems(cfg) if "hang_timeout" in p]
    assert "train.hang_timeout_minutes=30" in problem and "less than parallel.timeout_minutes=30" in problem
    cfg.train.hang_timeout_minutes = None
    assert not [p for p in config_problems(cfg) if "hang_timeout" in p]


def test_health_check_passes_names_a_wrong_matmul_and_a_rank_that_never_arrives():
    """Two ranks playing nodes n0 and n1: every rank reaches the same verdict, a fault on n1 names n1 alone."""
    done = subprocess.run(
        torchrun(2, [str(ROOT / "tests" / "health_check.py"), "none", "matmul@n1", "allreduce@n1"]),
        cwd=ROOT,
        env=child_env({"TIMEOUT": "5"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    clean, matmul, allreduce = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert clean["ok"] and clean["nodes"] == ["n0", "n1"] and clean["allreduce_bytes"] == 4 << 20
    assert clean["allreduce_seconds"] > 0
    assert not matmul["ok"] and list(matmul["failing"]) == ["n1"]
    (problem,) = matmul["failing"]["n1"]
    assert problem.startswith("rank 1: a 256x256 float32 matmul on cpu") and "known product" in problem
    assert allreduce["failing"] == {"n1": ["rank 1 did not reach the all-reduce within 5 s"]}
    assert not allreduce["job_problems"]


def test_a_node_failing_its_health_check_is_excluded_and_the_run_stops_before_training(tiny_data, tmp_path):
    run = tmp_path / "run"
    add_excluded_nodes(run, ["node7"])
    done = run_cli(
        ["train", *TINY, "train.iters=2", *data_overrides(tiny_data, run)],
        env={"BIGSCIENCE_HEALTH_FAULT": "matmul", "SLURMD_NODENAME": ""},
    )
    node = socket.gethostname()
    assert done.returncode == HEALTH_EXIT_CODE, done.stderr
    assert f"node {node} failed the health check: rank 0: a 256x256 float32 matmul" in done.stdout
    assert read_excluded_nodes(run) == ["node7", node]
    assert (run / "slurm" / "excluded_nodes").read_text() == f"node7\n{node}\n"
    last = json.loads((run / "last_stop.json").read_text())
    assert last["reason"] == "health" and last["step"] == 0 and node in last["error"]
    assert not (run / "metrics.jsonl").exists()
    add_excluded_nodes(run, [node, "node8"])
    assert read_excluded_nodes(run) == ["node7", node, "node8"]


def test_later_jobs_render_excluded_nodes_and_the_chain_reads_aborted_stops(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = [
        *TINY,
        "train.iters=8",
        *data_overrides(tiny_data, run),
        "cluster=local_dev",
        "cluster.exclude=node9",
    ]
    assert "#SBATCH --exclude=node9\n" in prepare_training(args).script
    add_excluded_nodes(run, ["node2", "node9"])
    assert "#SBATCH --exclude=node9,node2\n" in prepare_training(args).script
    assert "#SBATCH --exclude=node2,node9\n" in prepare_training(args[:-1]).script
    error = f"no training step finished for 0.5 min after step 3; stacks in {run}/hangs/12"
    write_last_stop(run, "hang", 3, 1536, "step_0000002", error=error)
    code, message = decide(run, HANG_EXIT_CODE, None, chain=False)
    assert code == HANG_EXIT_CODE and message.startswith(f"the job hung at step 3: {error}")
    assert message.endswith("submit again to continue from checkpoint step_0000002")
    write_last_stop(run, "health", 2, 1024, "step_0000002", error="node node2 failed the health check: ...")
    code, message = decide(run, 0, None, chain=False)
    assert code == 1 and "the node health check failed at step 2: node node2 failed" in message
    assert "excluded nodes: node2,node9 (later jobs are rendered with --exclude)" in message
