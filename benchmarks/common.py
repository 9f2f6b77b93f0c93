"""What every benchmark shares: timing a callable and writing its result where run_all finds it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def time_per_call(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def write_result(name: str, result: dict) -> Path:
    """result: {"figures": {...}, "ratios": {name: {"value": x, "target": y}}}"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
