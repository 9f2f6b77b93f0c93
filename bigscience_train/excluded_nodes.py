"""RUN/slurm/excluded_nodes: the nodes a run's health check found broken, one hostname per line. The trainer
adds to it; `bigscience slurm` renders every later job of the run with them in `--exclude` (neither knows
the other)."""

from __future__ import annotations

import re
from pathlib import Path

from bigscience_train.fsutil import atomic_write_text

EXCLUDED_NODES_FILE = Path("slurm") / "excluded_nodes"
_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def excluded_nodes_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXCLUDED_NODES_FILE


def read_excluded_nodes(run_dir: str | Path) -> list[str]:
    """The run's excluded nodes in the order they were found; a line that is no hostname is an error naming it."""
    path = excluded_nodes_path(run_dir)
    if not path.is_file():
        return []
    nodes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if not _HOSTNAME.match(name):
            raise ValueError(f"{path}:{number}: {name!r} is not a hostname (one node name per line)")
        if name not in nodes:
            nodes.append(name)
    return nodes


def add_excluded_nodes(run_dir: str | Path, nodes: list[str]) -> list[str]:
    """Appends the nodes not listed yet, replacing the file atomically; returns the whole list."""
    for name in nodes:
        if not _HOSTNAME.match(name):
            raise ValueError(f"cannot exclude {name!r}: not a hostname")
    listed = read_excluded_nodes(run_dir)
    merged = listed + [n for n in dict.fromkeys(nodes) if n not in listed]
    if merged != listed:
        atomic_write_text(excluded_nodes_path(run_dir), "".join(f"{n}\n" for n in merged))
    return merged
