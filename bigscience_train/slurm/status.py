"""`bigscience slurm status RUN`: the jobs of a run's chain and where training stands.

Job states come from `scontrol show job` (Slurm keeps finished jobs for MinJobAge) and, on clusters with
accounting, `sacct` for older ones. The exit code makes it a watchdog: 0 while a job of the run is running or
queued, 1 otherwise.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from bigscience_train.checkpoint.paths import latest_checkpoint
from bigscience_train.last_stop import read_last_stop
from bigscience_train.slurm.directives import time_seconds

JOBS_FILE = "jobs.jsonl"
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
}
_FIELD = re.compile(r"(\w+)=(\S*)")


@dataclass
class JobState:
    job_id: str
    state: str
    elapsed: str = ""
    limit: str = ""
    nodes: str = ""
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def left(self) -> str:
        if self.state != "RUNNING":
            return ""
        try:
            seconds = time_seconds(self.limit) - time_seconds(self.elapsed)
        except ValueError:
            return ""
        return f"{max(seconds, 0) // 3600:d}:{max(seconds, 0) % 3600 // 60:02d}:{max(seconds, 0) % 60:02d}"


def job_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "slurm" / JOBS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _scontrol(job_id: str) -> list[JobState] | None:
    done = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return None  # purged (older than MinJobAge) or unknown
    states = []
    for line in done.stdout.splitlines():
        f = dict(_FIELD.findall(line))
        if "JobId" not in f:
            continue
        task = f.get("ArrayTaskId")
        label = f"{f['ArrayJobId']}_{task}" if task and task != "N/A" else f["JobId"]
        node_list = f.get("NodeList", "")
        states.append(
            JobState(
                label,
                f.get("JobState", "?"),
                f.get("RunTime", ""),
                f.get("TimeLimit", ""),
                "" if node_list == "(null)" else node_list,
                f.get("Reason", ""),
            )
        )
    return states


def _sacct(job_id: str) -> list[JobState]:
    done = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,Elapsed,Timelimit,NodeList"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return []
    rows = [line.split("|") for line in done.stdout.splitlines() if line.count("|") == 4]
    return [JobState(r[0], r[1].split()[0], r[2], r[3], r[4]) for r in rows]


def query(job_id: str) -> list[JobState]:
    found = _scontrol(job_id)
    if found is None:
        found = _sacct(job_id) or [JobState(job_id, "UNKNOWN", reason="no longer known to Slurm")]
    return found


def training_progress(run_dir: Path) -> dict:
    """Step, tokens and checkpoint from the run's files (no Slurm needed)."""
    run_dir = Path(run_dir)
    info: dict = {"step": 0, "tokens": 0, "checkpoint": None, "iters": None, "last_stop": None}
    config = run_dir / "config.yaml"
    if not config.is_file():
        config = run_dir / "slurm" / "config.yaml"
    if config.is_file():
        info["iters"] = OmegaConf.load(config).train.get("iters")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text().splitlines()
        for line in reversed(lines):
            record = json.loads(line)
            if record.get("kind") == "train":
                info["step"], info["tokens"] = record["step"], record["consumed_tokens"]
                break
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is not None:
        info["checkpoint"] = latest.name
        saved = json.loads((latest / "train_state.json").read_text())
        if saved["step"] >= info["step"]:
            info["step"], info["tokens"] = saved["step"], saved["consumed_tokens"]
    info["last_stop"] = read_last_stop(run_dir)
    return info


def run_status(run_dir: Path) -> tuple[list[JobState], dict]:
    records = job_records(run_dir)
    jobs: list[JobState] = []
    for record in records:
        job_id = record["job_id"]
        if record.get("array_task") is not None:
            job_id = f"{job_id}_{record['array_task']}"
        jobs += query(job_id)
    return jobs, training_progress(run_dir)


def format_status(run_dir: Path, jobs: list[JobState], progress: dict) -> str:
    iters = progress["iters"]
    of = f" of {iters} ({100 * progress['step'] / iters:.0f}%)" if iters else ""
    lines = [
        f"run {run_dir}",
        f"  step {progress['step']}{of}, {progress['tokens']:,} tokens; "
        f"last checkpoint {progress['checkpoint'] or 'none'}",
    ]
    last = progress["last_stop"]
    if last:
        lines.append(f"  last clean stop: {last['reason']} at step {last['step']} ({last['time']})")
    if not jobs:
        lines.append("  no Slurm jobs recorded for this run (bigscience slurm submit records them)")
    else:
        lines.append(f"  {'JOB':<16} {'STATE':<12} {'ELAPSED':>11} {'LIMIT':>11} {'LEFT':>10}  NODES/REASON")
        for j in jobs:
            where = j.nodes if j.state == "RUNNING" else j.reason if j.reason not in ("None", "") else j.nodes
            lines.append(
                f"  {j.job_id:<16} {j.state:<12} {j.elapsed:>11} {j.limit:>11} {j.left:>10}  {where}"
            )
    if any(j.active for j in jobs):
        verdict = "running" if any(j.state == "RUNNING" for j in jobs) else "queued"
    elif last and last["finished"]:
        verdict = "finished (no job running or queued)"
    elif last and last["reason"] == "kill_switch":
        verdict = "stopped by the kill switch (no job running or queued)"
    else:
        verdict = "NOT running or queued: submit again to continue"
    lines.append(f"  state: {verdict}")
    return "\n".join(lines)


def status(run_dir: Path) -> tuple[int, str]:
    jobs, progress = run_status(run_dir)
    return (0 if any(j.active for j in jobs) else 1), format_status(run_dir, jobs, progress)
