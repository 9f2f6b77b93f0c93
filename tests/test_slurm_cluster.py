"""End to end on a real two-node Slurm cluster on this machine (slurm/local_cluster.sh).

Under CI=true these must run: a cluster that cannot start is a failure. Elsewhere, without root, they are
skipped with the reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bigscience_train.checkpoint.reader import iter_model_tensors, resolve_checkpoint
from tests.conftest import ROOT, data_overrides, read_metrics, run_cli

CLUSTER_SCRIPT = ROOT / "slurm" / "local_cluster.sh"
CLUSTER_DIR = Path(os.environ.get("BIGSCIENCE_SLURM_DIR", "/var/tmp/bigscience-slurm"))
IN_CI = os.environ.get("CI") == "true"

TRAIN = [
    "model=gpt_tiny",
    "parallel.tp=2",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.iters=320",
    "train.eval_interval=1000",
    "train.eval_iters=2",
    "optim.lr=3e-3",
    "optim.warmup_samples=16",
    "checkpoint.interval=1000",
    "logging.log_interval=10",
    "cluster=local_dev",
]


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true needs the local Slurm cluster: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_env():
    if os.geteuid() != 0:
        _unavailable("the local Slurm cluster needs root (slurm/local_cluster.sh installs and starts it)")
    env = {**os.environ, "SLURM_CONF": str(CLUSTER_DIR / "slurm.conf"), "PYTHONHASHSEED": "0"}
    # On a fresh machine Slurm is not installed yet: local_cluster.sh installs it below.
    was_up = (
        shutil.which("sinfo") is not None
        and subprocess.run(["sinfo"], env=env, capture_output=True).returncode == 0
    )
    started = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900
    )
    if started.returncode != 0:
        _unavailable(f"slurm/local_cluster.sh start failed:\n{started.stdout}\n{started.stderr}")
    yield env
    if not was_up:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)


def bigscience(env: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bigscience_train.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def submitted_job(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr + done.stdout
    return re.search(r"submitted (?:job|array) (\d+)", done.stdout).group(1)


def wait_until_idle(env: dict, run_dir: Path, cwd: Path, timeout: float) -> str:
    """Polls `slurm status` (a watchdog's view) until no job of the run is running or queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = bigscience(env, "slurm", "status", str(run_dir), cwd=cwd)
        if done.returncode == 1:
            return done.stdout
        assert done.returncode == 0, done.stderr
        time.sleep(3)
    pytest.fail(f"jobs of {run_dir} still queued or running after {timeout:.0f}s:\n{logs(run_dir)}")


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm" / "logs").glob("*.out")))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_model_tensors(resolve_checkpoint(run_dir)))


def iters_for_two_minutes(tiny_data, run_dir: Path) -> int:
    """Steps of TRAIN that take about two minutes on this machine, at the speed of a short run of the same 4
    ranks under torchrun: at least 320 (0.30-0.47 s a step on a slow machine), 670 at 0.18 s a step."""
    out = run_cli(["train", *TRAIN, "train.iters=30", *data_overrides(tiny_data, run_dir)], nproc=4)
    assert out.returncode == 0, out.stderr
    later = read_metrics(run_dir)[1:]  # each record averages 10 steps; the first has the warm-up in it
    step_time = sum(r["step_time"] for r in later) / len(later)
    return max(320, 10 * math.ceil(12 / step_time))


def test_two_nodes_train_to_completion_and_a_cut_chain_ends_identical(slurm_env, tiny_data, tmp_path):
    # The chain below cuts the run at least twice however fast the machine is: its training lasts more than
    # twice the longest a job trains (see the chain).
    iters = iters_for_two_minutes(tiny_data, tmp_path / "runs" / "timing")
    pwn = tmp_path / "pwned"
    straight = tmp_path / "runs" / "straight"
    job = submitted_job(
        bigscience(
            slurm_env,
            "slurm",
            "submit",
            *TRAIN,
            f"train.iters={iters}",
            *data_overrides(tiny_data, straight),
            f"name='x$(touch {pwn})'",
            "logging.carbon=true",
            cwd=tmp_path,
        )
    )
    status = wait_until_idle(slurm_env, straight, tmp_path, timeout=600)
    out = logs(straight)
    assert "world 4 (tp=2 pp=1 dp=2)" in out and "[rank0]:" in out, out
    assert f"{job}  " in status or re.search(rf"{job}\s+COMPLETED\s", status), status
    assert "COMPLETED" in status and "node[1-2]" in status and "state: finished" in status
    assert json.loads((straight / "last_stop.json").read_text())["reason"] == "iters"
    assert not pwn.exists()
    carbon = sorted(p.name for p in (straight / "carbon").glob("*.csv"))
    assert carbon == [f"emissions-job{job}-node000.csv", f"emissions-job{job}-node001.csv"], carbon

    # The same run under a 2-minute limit with the stop signal 60 s before it (Slurm may send it up to a minute
    # earlier still): after a start of about 20 s each job trains at most ~40 s, less than half the run, so the
    # chain cuts it at least twice (measured at 0.30-0.37 s a step and 320 steps: 5 cuts, about 55 steps a
    # job). At 30 s before it a job trained up to 70 s; at 0.18 s a step, 320 steps were cut only once.
    chain = tmp_path / "runs" / "chain"
    submitted_job(
        bigscience(
            slurm_env,
            "slurm",
            "submit",
            *TRAIN,
            f"train.iters={iters}",
            *data_overrides(tiny_data, chain),
            "name=chain",
            "cluster.time=2",
            "cluster.signal_seconds=60",
            "cluster.chain_jobs=12",
            cwd=tmp_path,
        )
    )
    status = wait_until_idle(slurm_env, chain, tmp_path, timeout=1500)
    out = logs(chain)
    cuts = re.findall(r"\[chain\] stopped at step (\d+) \(signal\)", out)
    assert len(cuts) >= 2, out
    assert f"training finished at step {iters}" in out and "cancelled the pending jobs" in out, out
    assert "state: finished" in status and "CANCELLED" in status, status
    a, b = final_weights(straight), final_weights(chain)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sweep_array_gives_each_task_its_run(slurm_env, tiny_data, tmp_path):
    root = tmp_path / "runs" / "lr_sweep"
    done = bigscience(
        slurm_env,
        "slurm",
        "sweep",
        "--max-parallel",
        "2",
        *data_overrides(tiny_data, root),
        "name=lr_sweep",
        "optim.lr=1e-3,2e-3,4e-3",
        "train.iters=3",
        "train.eval_iters=0",
        "cluster=local_dev",
        "cluster.nodes=1",
        "cluster.procs_per_node=1",
        cwd=tmp_path,
    )
    submitted_job(done)
    status = wait_until_idle(slurm_env, root, tmp_path, timeout=600)
    assert status.count("COMPLETED") == 3, status
    manifest = json.loads((root / "sweep.json").read_text())
    assert len(manifest) == 3
    for task, lr in zip(manifest, (1e-3, 2e-3, 4e-3), strict=True):
        run = Path(task["run_dir"])
        assert OmegaConf.load(run / "config.yaml").optim.lr == lr
        assert json.loads((run / "last_stop.json").read_text())["step"] == 3
        assert bigscience(slurm_env, "slurm", "status", str(run), cwd=tmp_path).returncode == 1


def test_kill_switch_stops_the_chain_and_status_follows_it(slurm_env, tiny_data, tmp_path):
    run = tmp_path / "runs" / "killed"
    submitted_job(
        bigscience(
            slurm_env,
            "slurm",
            "submit",
            *TRAIN,
            *data_overrides(tiny_data, run),
            "name=killed",
            "train.iters=100000",
            "logging.log_interval=1",
            "cluster.chain_jobs=3",
            cwd=tmp_path,
        )
    )
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline, logs(run)
        time.sleep(1)
    running = bigscience(slurm_env, "slurm", "status", str(run), cwd=tmp_path)
    assert running.returncode == 0 and "RUNNING" in running.stdout and "PENDING" in running.stdout
    assert "state: running" in running.stdout
    again = bigscience(
        slurm_env, "slurm", "submit", *TRAIN, *data_overrides(tiny_data, run), "name=killed", cwd=tmp_path
    )
    assert again.returncode == 2 and "already has job(s)" in again.stderr
    (run / "kill-switch").touch()
    status = wait_until_idle(slurm_env, run, tmp_path, timeout=300)
    last = json.loads((run / "last_stop.json").read_text())
    assert last["reason"] == "kill_switch" and last["checkpoint"] == f"step_{last['step']:07d}"
    assert "stopped by the kill switch" in status and "CANCELLED" in status, status
    assert "kill switch" in logs(run)


def test_preprocessing_shards_as_an_array_then_merge(slurm_env, tiny_data, tmp_path):
    prefix = tmp_path / "data" / "corpus"
    done = bigscience(
        slurm_env,
        "slurm",
        "preprocess",
        "--input",
        str(tiny_data["corpus"]),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        tiny_data["tokenizer"],
        "--num-shards",
        "2",
        "--append-eod",
        "cluster=local_dev",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    jobs_dir = tmp_path / "data" / "corpus.slurm"
    wait_until_idle(slurm_env, jobs_dir, tmp_path, timeout=300)
    for suffix in (".bin", ".idx"):
        merged = Path(f"{prefix}{suffix}").read_bytes()
        assert merged == Path(tiny_data["prefix"] + suffix).read_bytes(), logs(jobs_dir)


def test_checkpoints_of_a_run_evaluated_as_an_array_once(slurm_env, tiny_data, tmp_path):
    from tests.test_train import train

    run = tmp_path / "run"
    train(tiny_data, run, "train.iters=4", "checkpoint.interval=2")
    args = ["slurm", "eval", str(run), "tasks=[stdlib_choice]", "limit=10", "cluster=local_dev"]
    submitted_job(bigscience(slurm_env, *args, cwd=tmp_path))
    wait_until_idle(slurm_env, run, tmp_path, timeout=300)
    for step in ("step_0000002", "step_0000004"):
        results = json.loads((run / "eval" / step / "results.json").read_text())
        assert 0 <= results["results"]["stdlib_choice"]["acc,none"] <= 1, logs(run)
    again = bigscience(slurm_env, *args, cwd=tmp_path)
    assert again.returncode == 0 and "nothing submitted" in again.stdout


def test_a_cluster_killed_with_jobs_running_starts_again_idle(slurm_env, tmp_path):
    """A machine restart kills the daemons mid-job: the next `start` must not resume the dead jobs."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--array=1-4", "--nodes=2", "--wrap", "sleep 20"],
        env=slurm_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    for pidfile in [CLUSTER_DIR / "slurmctld.pid", *CLUSTER_DIR.glob("slurmd-*.pid")]:
        os.kill(int(pidfile.read_text()), 9)
    started = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=300
    )
    assert started.returncode == 0, started.stderr
    queue = subprocess.run(["squeue", "-h"], env=slurm_env, capture_output=True, text=True)
    assert queue.returncode == 0 and queue.stdout == "", queue.stdout + queue.stderr
