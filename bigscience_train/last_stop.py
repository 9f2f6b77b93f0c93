"""RUN/last_stop.json: why and where the trainer last stopped cleanly. The trainer writes it; job chains and
`bigscience slurm status` read it (they know nothing of the trainer itself)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bigscience_train.fsutil import atomic_write_text

LAST_STOP_FILE = "last_stop.json"
# Stops that end a run; any other (signal, kill switch, time guard) interrupts it.
FINISHED_STOPS = ("iters", "tokens")
# Stops of a run that cannot go on as it is (the trainer's NonFiniteLossError): its chain ends, not resumes.
FAILED_STOPS = ("nonfinite", "loss_scale_floor")
# Stops of a job that ended abnormally with the run intact (train/watchdog.py: no step finished in time;
# train/preflight.py: a node failed the health check): the job fails, the chain goes on from `latest`.
ABORTED_STOPS = ("hang", "health")


def write_last_stop(
    run_dir: Path,
    reason: str,
    step: int,
    consumed_tokens: int,
    checkpoint: str | None,
    error: str | None = None,
) -> None:
    record = {
        "reason": reason,
        "finished": reason in FINISHED_STOPS,
        "step": step,
        "consumed_tokens": consumed_tokens,
        "checkpoint": checkpoint,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if error is not None:
        record["error"] = error
    atomic_write_text(Path(run_dir) / LAST_STOP_FILE, json.dumps(record, indent=2) + "\n")


def read_last_stop(run_dir: Path) -> dict | None:
    path = Path(run_dir) / LAST_STOP_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
