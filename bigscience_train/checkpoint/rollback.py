"""BigScience's recovery from a loss spike, in one command: go back to a checkpoint before it, optionally skip
the data the run consumed since, optionally scale the learning rate.

`rollback` moves every later checkpoint aside (never deletes it), points `latest` at the chosen step and
leaves the request in checkpoints/rollback.json; the trainer applies it when it resumes from that step
(`apply_rollback`), and both the request and its application are logged in RUN/rollbacks.jsonl. Skipping
data continues from the furthest point the run reached (its step, samples and tokens, so the data, the
iteration count and the LR schedule all move past the skipped batches) with the weights and optimizer of
the chosen step. Plain files, no torch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bigscience_train.checkpoint.paths import LATEST, committed_steps, step_dir_name
from bigscience_train.fsutil import atomic_write_text

REQUEST = "rollback.json"
LOG = "rollbacks.jsonl"
ASIDE = "rolled_back"


@dataclass(frozen=True)
class Position:
    step: int
    consumed_samples: int
    consumed_tokens: int


def _state_of(step_dir: Path) -> Position:
    state = json.loads((step_dir / "train_state.json").read_text())
    return Position(state["step"], state["consumed_samples"], state["consumed_tokens"])


def furthest_position(run_dir: Path, checkpoints: list[Path]) -> Position:
    """The furthest point the run reached: its last logged training step or its newest checkpoint."""
    positions = [_state_of(p) for p in checkpoints]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a killed job
            if record.get("kind") == "train":
                positions.append(
                    Position(record["step"], record["consumed_samples"], record["consumed_tokens"])
                )
    return max(positions, key=lambda p: p.step)


def _log(run_dir: Path, record: dict) -> None:
    with open(run_dir / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def rollback(run_dir: Path, to_step: int, skip_data: bool, lr_scale: float) -> dict:
    """Points the run at checkpoint `to_step`; returns the request the trainer will apply."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    steps = committed_steps(root)
    if to_step not in steps:
        have = ", ".join(map(str, steps)) or "none"
        raise ValueError(f"{root} has no complete checkpoint of step {to_step} (complete: {have})")
    if lr_scale <= 0:
        raise ValueError(f"--lr-scale {lr_scale}: must be positive")
    later = [root / step_dir_name(s) for s in steps if s > to_step]
    target = root / step_dir_name(to_step)
    furthest = furthest_position(run_dir, [target, *later])
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = root / ASIDE / f"{stamp}-to-{to_step}"
    request = {
        "to_step": to_step,
        "skip_to": furthest.__dict__ if skip_data and furthest.step > to_step else None,
        "lr_scale": lr_scale,
        "moved_aside": [str((aside / p.name).relative_to(run_dir)) for p in later],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # The request first: an interruption after it leaves a run that still resumes where it was asked to.
    atomic_write_text(root / REQUEST, json.dumps(request, indent=2) + "\n")
    if later:
        aside.mkdir(parents=True)
        for p in later:
            os.rename(p, aside / p.name)
    atomic_write_text(root / LATEST, target.name + "\n")
    _log(run_dir, {"event": "rollback requested", **request})
    return request


def pending_rollback(root: Path) -> dict | None:
    path = Path(root) / REQUEST
    return json.loads(path.read_text()) if path.is_file() else None


def finish_rollback(run_dir: Path, request: dict, applied: dict) -> None:
    """Records that the trainer applied the request (rank 0, once), and clears it."""
    run_dir = Path(run_dir)
    _log(run_dir, {"event": "rollback applied", **request, **applied})
    (run_dir / "checkpoints" / REQUEST).unlink()
