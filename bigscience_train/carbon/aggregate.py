"""A run's energy and emissions: codecarbon's per-node CSVs summed over nodes and over the jobs of a chain, and
the independent estimate of the BLOOM carbon paper (Luccioni et al. 2022).

codecarbon's rows are cumulative within a tracker run (one `run_id`): a run's total is its last row, and the
run's total is the sum of those over every tracker run (every node of every job).

Estimate: device-hours x device TDP x PUE x grid intensity, device-hours being each tracker run's duration
times the devices of its node (the run's world size over the job's node count).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bigscience_train.carbon.tracker import CARBON_DIR
from bigscience_train.checkpoint.paths import latest_checkpoint


@dataclass
class TrackerRun:
    """The last (cumulative) row of one tracker run, and its rows over time."""

    file: str
    run_id: str
    energy_kwh: float
    emissions_kg: float
    duration_s: float
    series: list[tuple[datetime, float, float]] = field(default_factory=list)


@dataclass
class CarbonTotals:
    runs: list[TrackerRun]
    energy_kwh: float
    emissions_kg: float
    measured: bool | None  # None: no node recorded how it was measured
    methods: list[str]
    pue: float | None
    intensity_g_per_kwh: float | None
    estimate_kwh: float | None = None
    estimate_kg: float | None = None
    estimate_note: str = ""

    @property
    def jobs(self) -> list[str]:
        return sorted({_job_of(r.file) for r in self.runs})

    def over_time(self) -> list[tuple[datetime, float, float]]:
        """Cumulative (time, kWh, kg) of the whole run: each tracker run at its latest row so far."""
        events = sorted((t, i, e, c) for i, r in enumerate(self.runs) for t, e, c in r.series)
        latest: dict[int, tuple[float, float]] = {}
        points = []
        for t, i, e, c in events:
            latest[i] = (e, c)
            points.append((t, sum(v[0] for v in latest.values()), sum(v[1] for v in latest.values())))
        return points


def _job_of(file: str) -> str:
    return file.split("-job", 1)[1].rsplit("-node", 1)[0]


def read_tracker_runs(carbon_dir: Path) -> list[TrackerRun]:
    runs: list[TrackerRun] = []
    for path in sorted(Path(carbon_dir).glob("emissions-job*-node*.csv")):
        by_run: dict[str, TrackerRun] = {}
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                try:
                    energy, kg = float(row["energy_consumed"]), float(row["emissions"])
                    when = datetime.fromisoformat(row["timestamp"])
                    duration = float(row["duration"])
                except (KeyError, TypeError, ValueError):
                    continue  # a row cut short by a killed job
                run = by_run.setdefault(row["run_id"], TrackerRun(path.name, row["run_id"], 0.0, 0.0, 0.0))
                run.energy_kwh, run.emissions_kg, run.duration_s = energy, kg, duration
                run.series.append((when, energy, kg))
        runs += by_run.values()
    return runs


def _world_size(run_dir: Path) -> int | None:
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        return None
    layout = json.loads((latest / "meta.json").read_text()).get("layout", {})
    return layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1)


def carbon_totals(
    run_dir: Path, tdp_watts: float | None, pue: float | None, intensity: float | None
) -> CarbonTotals:
    """Totals of RUN/carbon; the estimate needs the device's TDP (None: explained in estimate_note)."""
    run_dir = Path(run_dir)
    runs = read_tracker_runs(run_dir / CARBON_DIR)
    energy = sum(r.energy_kwh for r in runs)
    kg = sum(r.emissions_kg for r in runs)
    infos = [json.loads(p.read_text()) for p in sorted((run_dir / CARBON_DIR).glob("node-job*-node*.json"))]
    measured = None if not infos else all(i["measured"] for i in infos)
    methods = sorted({i["method"] for i in infos})
    if pue is None and infos:
        pue = infos[0]["pue"]
    if intensity is None and energy > 0:
        intensity = kg / energy * 1000  # what codecarbon used for the country
    totals = CarbonTotals(runs, energy, kg, measured, methods, pue, intensity)
    world = _world_size(run_dir)
    nodes_per_job = Counter(_job_of(file) for file in {r.file for r in runs})  # one CSV per node and job
    if tdp_watts is None:
        totals.estimate_note = "no TDP known for this device (set cluster.tdp_watts)"
    elif world is None:
        totals.estimate_note = "no checkpoint yet to read the run's world size from"
    elif intensity is None:
        totals.estimate_note = "no grid intensity (set cluster.carbon_intensity)"
    else:
        device_hours = sum(r.duration_s / 3600 * world / nodes_per_job[_job_of(r.file)] for r in runs)
        totals.estimate_kwh = device_hours * tdp_watts * (pue or 1.0) / 1000
        totals.estimate_kg = totals.estimate_kwh * intensity / 1000
        totals.estimate_note = f"{device_hours:.4g} device-hours x {tdp_watts:g} W TDP x PUE {pue or 1.0:g} x {intensity:.4g} g/kWh"
    return totals
