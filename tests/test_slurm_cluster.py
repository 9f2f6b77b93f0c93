"""End to end on a real two-node Slurm cluster on this machine (slurm/local_cluster.sh).

Under CI=true these must run: a cluster that cannot start is a failure. Elsewhere, without root, they are
skipped with the reason. Every wait of a test draws on one Budget that ends before pytest's timeout of the
test, and a test out of time fails with the jobs' states and logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from omegaconf import OmegaConf

from bigscience_train.checkpoint.reader import iter_model_tensors, resolve_checkpoint
from bigscience_train.slurm.status import ACTIVE_STATES
from tests.conftest import ROOT, data_overrides

CLUSTER_SCRIPT = ROOT / "slurm" / "local_cluster.sh"
CLUSTER_DIR = Path(os.environ.get("BIGSCIENCE_SLURM_DIR", "/var/tmp/bigscience-slurm"))
IN_CI = os.environ.get("CI") == "true"
# Seconds the waits of a test share: under pytest's 600 s timeout per test (pyproject.toml).
BUDGET = 480
# The chain test's own timeout; its waits end a minute before it.
CHAIN_TIMEOUT = 420

TRAIN = [
    "model=gpt_tiny",
    "parallel.tp=2",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.iters=30",
    "train.eval_interval=1000",
    "train.eval_iters=0",
    "optim.lr=3e-3",
    "optim.warmup_samples=16",
    "checkpoint.interval=1000",
    "logging.log_interval=1",
    "cluster=local_dev",
]
T = TypeVar("T")


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


def logs(run_dir: Path, tail: int | None = None) -> str:
    """The run's Slurm logs in job order; with `tail`, each one's last lines."""
    texts = [p.read_text() for p in sorted((run_dir / "slurm" / "logs").glob("*.out"))]
    if tail:
        texts = ["\n".join(text.splitlines()[-tail:]) for text in texts]
    return "\n".join(texts)


def own_cache(tiny_data: dict, run_dir: Path) -> list[str]:
    """data_overrides with an index cache of the run's own: runs at once would write the same cache files."""
    shared = [o for o in data_overrides(tiny_data, run_dir) if not o.startswith("data.cache_dir=")]
    return [*shared, f"data.cache_dir={run_dir.parent / (run_dir.name + '-cache')}"]


class Budget:
    """The seconds a test may still wait, shared by all its waits and commands."""

    def __init__(self, seconds: float, env: dict, *run_dirs: Path):
        self.end = time.monotonic() + seconds
        self.env = env
        self.run_dirs = run_dirs

    def left(self) -> float:
        return self.end - time.monotonic()

    def fail(self, what: str):
        queue = subprocess.run(
            ["squeue", "-t", "all", "-o", "%i %j %T %M %l %R"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        runs = "\n".join(f"--- last log lines of {d}:\n{logs(d, tail=40)}" for d in self.run_dirs)
        pytest.fail(f"out of time waiting for {what}\n--- squeue:\n{queue.stdout}{queue.stderr}{runs}")

    def wait(self, what: str, done: Callable[[], T], poll: float = 1.0) -> T:
        while not (result := done()):
            if self.left() <= 0:
                self.fail(what)
            time.sleep(min(poll, max(self.left(), 0)))
        return result

    def run(self, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
        if self.left() <= 0:
            self.fail(" ".join(args))
        try:
            return subprocess.run(
                args, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=self.left()
            )
        except subprocess.TimeoutExpired:
            self.fail(" ".join(args))

    def bigscience(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "bigscience_train.cli", *args], cwd)


def submitted_job(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr + done.stdout
    return re.search(r"submitted (?:job|array) (\d+)", done.stdout).group(1)


def wait_until_idle(budget: Budget, run_dir: Path, cwd: Path) -> str:
    """Polls `slurm status` (a watchdog's view) until no job of the run is running or queued."""

    def idle() -> str | None:
        done = budget.bigscience("slurm", "status", str(run_dir), cwd=cwd)
        assert done.returncode in (0, 1), done.stderr
        return done.stdout if done.returncode == 1 else None

    return budget.wait(f"the jobs of {run_dir} to end", idle, poll=3)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_model_tensors(resolve_checkpoint(run_dir)))


def last_step(run_dir: Path) -> int:
    """The last training step the run has logged (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):  # the line being written
            record = json.loads(line)
            steps += [record["step"]] if record["kind"] == "train" else []
    return max(steps)


def job_state(budget: Budget, job_id: str) -> str:
    done = budget.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], ROOT)
    return done.stdout.strip()


def signal_once_trained(budget: Budget, array_job: str, run_dir: Path) -> int:
    """The stop signal to the chain's running job once it has trained, as Slurm's --signal sends it ahead of
    a time limit (to the job's steps); returns the step the job stopped at."""
    budget.wait(f"a job of chain {array_job} to train", lambda: last_step(run_dir) > 0)
    job = budget.run(["squeue", "-h", "-t", "RUNNING", "-j", array_job, "-o", "%A"], ROOT).stdout.strip()
    assert job, f"no running job in chain {array_job}"
    # With more than one task pending, Slurm also answers for the array's pending record, which cannot take a
    # signal, and scancel signals the running job again and again: the chain has one job after this one.
    signalled = budget.run(["scancel", "--signal=USR1", job], ROOT)
    assert signalled.returncode == 0, signalled.stderr
    budget.wait(f"job {job} to stop on the signal", lambda: job_state(budget, job) not in ACTIVE_STATES)
    stops = re.findall(r"\[chain\] stopped at step (\d+) \(signal\)", logs(run_dir))
    assert len(stops) == 1, logs(run_dir)
    return int(stops[0])


@pytest.mark.timeout(CHAIN_TIMEOUT, func_only=True)
def test_two_nodes_train_to_completion_and_a_cut_chain_ends_identical(slurm_env, tiny_data, tmp_path):
    straight, chain = tmp_path / "runs" / "straight", tmp_path / "runs" / "chain"
    budget = Budget(CHAIN_TIMEOUT - 60, slurm_env, straight, chain)
    pwn = tmp_path / "pwned"
    # Both runs at once: each takes half of every node's CPUs.
    job = submitted_job(
        budget.bigscience(
            "slurm",
            "submit",
            *TRAIN,
            *own_cache(tiny_data, straight),
            f"name='x$(touch {pwn})'",
            "logging.carbon=true",
            cwd=tmp_path,
        )
    )
    array = submitted_job(
        budget.bigscience(
            "slurm",
            "submit",
            *TRAIN,
            *own_cache(tiny_data, chain),
            "name=chain",
            "cluster.chain_jobs=2",
            cwd=tmp_path,
        )
    )
    # The chain's first job stops on the signal, the second resumes and trains to the end.
    assert 0 < signal_once_trained(budget, array, chain) < 30

    status = wait_until_idle(budget, straight, tmp_path)
    out = logs(straight)
    assert "world 4 (tp=2 pp=1 dp=2)" in out and "[rank0]:" in out, out
    assert f"{job}  " in status or re.search(rf"{job}\s+COMPLETED\s", status), status
    assert "COMPLETED" in status and "node[1-2]" in status and "state: finished" in status
    assert json.loads((straight / "last_stop.json").read_text())["reason"] == "iters"
    assert not pwn.exists()
    carbon = sorted(p.name for p in (straight / "carbon").glob("*.csv"))
    assert carbon == [f"emissions-job{job}-node000.csv", f"emissions-job{job}-node001.csv"], carbon

    status = wait_until_idle(budget, chain, tmp_path)
    out = logs(chain)
    assert "training finished at step 30" in out, out
    assert "state: finished" in status and status.count("COMPLETED") == 2, status
    a, b = final_weights(straight), final_weights(chain)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_two_nodes_train_with_one_slurm_task_per_rank(slurm_env, tiny_data, tmp_path):
    run = tmp_path / "runs" / "srun"
    budget = Budget(BUDGET, slurm_env, run)
    args = [*TRAIN, *data_overrides(tiny_data, run), "name=srun", "train.iters=4", "cluster.launcher=srun"]
    job = submitted_job(budget.bigscience("slurm", "submit", *args, cwd=tmp_path))
    status = wait_until_idle(budget, run, tmp_path)
    out = logs(run)
    # srun --label starts each line with the task's rank.
    assert re.search(r"^0: .*world 4 \(tp=2 pp=1 dp=2\)", out, re.MULTILINE), out
    assert re.search(rf"{job}\s+COMPLETED\s", status) and "state: finished" in status, status
    last = json.loads((run / "last_stop.json").read_text())
    assert last["finished"] and last["reason"] == "iters" and last["checkpoint"] == "step_0000004", last
    assert resolve_checkpoint(run).name == "step_0000004"


def test_sweep_array_gives_each_task_its_run(slurm_env, tiny_data, tmp_path):
    root = tmp_path / "runs" / "lr_sweep"
    budget = Budget(BUDGET, slurm_env, root)
    done = budget.bigscience(
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
    status = wait_until_idle(budget, root, tmp_path)
    assert status.count("COMPLETED") == 3, status
    manifest = json.loads((root / "sweep.json").read_text())
    assert len(manifest) == 3
    for task, lr in zip(manifest, (1e-3, 2e-3, 4e-3), strict=True):
        run = Path(task["run_dir"])
        assert OmegaConf.load(run / "config.yaml").optim.lr == lr
        assert json.loads((run / "last_stop.json").read_text())["step"] == 3
        assert budget.bigscience("slurm", "status", str(run), cwd=tmp_path).returncode == 1


def test_kill_switch_stops_the_chain_and_status_follows_it(slurm_env, tiny_data, tmp_path):
    run = tmp_path / "runs" / "killed"
    budget = Budget(BUDGET, slurm_env, run)
    submitted_job(
        budget.bigscience(
            "slurm",
            "submit",
            *TRAIN,
            *data_overrides(tiny_data, run),
            "name=killed",
            "train.iters=100000",
            "cluster.chain_jobs=3",
            cwd=tmp_path,
        )
    )
    budget.wait(f"{run} to log 3 steps", lambda: last_step(run) >= 3)
    running = budget.bigscience("slurm", "status", str(run), cwd=tmp_path)
    assert running.returncode == 0 and "RUNNING" in running.stdout and "PENDING" in running.stdout
    assert "state: running" in running.stdout
    again = budget.bigscience(
        "slurm", "submit", *TRAIN, *data_overrides(tiny_data, run), "name=killed", cwd=tmp_path
    )
    assert again.returncode == 2 and "already has job(s)" in again.stderr
    (run / "kill-switch").touch()
    status = wait_until_idle(budget, run, tmp_path)
    last = json.loads((run / "last_stop.json").read_text())
    assert last["reason"] == "kill_switch" and last["checkpoint"] == f"step_{last['step']:07d}"
    assert "stopped by the kill switch" in status and "CANCELLED" in status, status
    assert "kill switch" in logs(run)


def test_preprocessing_shards_as_an_array_then_merge(slurm_env, tiny_data, tmp_path):
    prefix = tmp_path / "data" / "corpus"
    jobs_dir = tmp_path / "data" / "corpus.slurm"
    budget = Budget(BUDGET, slurm_env, jobs_dir)
    done = budget.bigscience(
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
    wait_until_idle(budget, jobs_dir, tmp_path)
    for suffix in (".bin", ".idx"):
        merged = Path(f"{prefix}{suffix}").read_bytes()
        assert merged == Path(tiny_data["prefix"] + suffix).read_bytes(), logs(jobs_dir)


def test_checkpoints_of_a_run_evaluated_as_an_array_once(slurm_env, tiny_data, tmp_path):
    from tests.test_train import train

    run = tmp_path / "run"
    train(tiny_data, run, "train.iters=4", "checkpoint.interval=2")
    budget = Budget(BUDGET, slurm_env, run)
    args = ["slurm", "eval", str(run), "tasks=[stdlib_choice]", "limit=10", "cluster=local_dev"]
    submitted_job(budget.bigscience(*args, cwd=tmp_path))
    wait_until_idle(budget, run, tmp_path)
    for step in ("step_0000002", "step_0000004"):
        results = json.loads((run / "eval" / step / "results.json").read_text())
        assert 0 <= results["results"]["stdlib_choice"]["acc,none"] <= 1, logs(run)
    again = budget.bigscience(*args, cwd=tmp_path)
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
