"""Where a run's checkpoints are and which are committed: plain files, no torch, so that Slurm status and the
report read them without loading the training stack."""

from __future__ import annotations

from pathlib import Path

LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The step directory root/latest names; None when there is no pointer yet."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def committed_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(
        int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit() and (p / "meta.json").is_file()
    )
