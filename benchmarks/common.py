"""What every benchmark shares: timing a callable and writing its result where run_all finds it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def time_per_call(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median seconds of `repeats` calls after `warmup` untimed ones."""
    return time_interleaved({"": fn}, warmup, repeats)[""]


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each of `fns`, timed in turns (one call of each per round) after `warmup`
    untimed calls of each: a drift of the machine's speed during the run falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def report(name: str, figures: dict, ratios: dict) -> Path:
    """Prints the figures and the ratios against their targets, then writes them (write_result)."""
    for key, value in figures.items():
        print(f"{key:34s} {value:,.2f}" if isinstance(value, float) else f"{key:34s} {value}")
    for key, r in ratios.items():
        print(f"{key:44s} {r['value']:6.2f}  (target {r['target']:.2f})")
    return write_result(name, {"figures": figures, "ratios": ratios})


def write_result(name: str, result: dict) -> Path:
    """result: {"figures": {...}, "ratios": {name: {"value": x, "target": y}}}"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
