"""Energy and emissions of one node, measured by codecarbon while training.

One tracker per node, on its local rank 0 (a tracker per rank would count the node once per rank), offline
(compute nodes have no internet), writing RUN/carbon/emissions-job{JOB}-node{NNN}.csv: codecarbon's rows are
cumulative for a tracker run, one row per flush. Beside it, a small JSON says how the node was measured (RAPL
and NVML, or codecarbon's estimates). A tracker that fails is reported once and switched off: carbon
accounting never stops training.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bigscience_train.fsutil import atomic_write_text

CARBON_DIR = "carbon"
# codecarbon's CPU modes that read real counters; anything else is an estimate from TDP or load.
MEASURED_CPU_MODES = ("intel_rapl", "intel_power_gadget", "apple_powermetrics", "amd_rapl")


def job_and_node() -> tuple[str, int]:
    """The scheduler's job id (or `local`) and this node's index in the job."""
    job = os.environ.get("SLURM_JOB_ID", "local")
    node = os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID") or "0"
    return job, int(node)


def csv_name(job: str, node: int) -> str:
    return f"emissions-job{job}-node{node:03d}.csv"


class NodeTracker:
    def __init__(self, run_dir: Path, cluster, interval_s: float, gpu_ids: list[int]):
        self.job, self.node = job_and_node()
        self.directory = Path(run_dir) / CARBON_DIR
        self._tracker = None
        self._failed = False
        self._guard("start", self._start, cluster, interval_s, gpu_ids)

    def _start(self, cluster, interval_s: float, gpu_ids: list[int]) -> None:
        from codecarbon import OfflineEmissionsTracker, OutputMethod

        self.directory.mkdir(parents=True, exist_ok=True)
        options = {
            "country_iso_code": cluster.country_iso_code or "FRA",
            "output_dir": str(self.directory),
            "output_file": csv_name(self.job, self.node),
            "measure_power_secs": interval_s,
            "pue": cluster.pue,
            "gpu_ids": gpu_ids or None,
            "tracking_mode": "machine",
            "log_level": "error",
            "output_methods": [OutputMethod.CSV],
            # No lock file: a job killed at its limit must not block the next one on the node.
            "allow_multiple_runs": True,
        }
        if cluster.carbon_intensity is not None:
            options["force_carbon_intensity_g_co2e_kwh"] = cluster.carbon_intensity
        tracker = OfflineEmissionsTracker(**options)
        tracker.start()
        self._tracker = tracker
        atomic_write_text(
            self.directory / f"node-job{self.job}-node{self.node:03d}.json",
            json.dumps(self._measurement(tracker, cluster), indent=2) + "\n",
        )

    @staticmethod
    def _measurement(tracker, cluster) -> dict:
        modes = {type(h).__name__: getattr(h, "_mode", None) for h in getattr(tracker, "_hardware", [])}
        gpu = "GPU" in modes
        cpu_measured = modes.get("CPU") in MEASURED_CPU_MODES
        return {
            "hardware": modes,
            "measured": gpu or cpu_measured,
            "method": "codecarbon: "
            + ("NVML for GPUs, " if gpu else "")
            + ("RAPL for the CPU" if cpu_measured else "CPU power estimated from its TDP or load (no RAPL)"),
            "country_iso_code": cluster.country_iso_code or "FRA",
            "pue": cluster.pue,
            "forced_carbon_intensity": cluster.carbon_intensity,
        }

    def _guard(self, what: str, fn, *args) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except Exception as e:  # any failure of the tracker: report once, keep training
            self._failed, self._tracker = True, None
            print(
                f"carbon tracking off for this run ({what} failed: {type(e).__name__}: {e})", file=sys.stderr
            )

    def flush(self) -> None:
        if self._tracker is not None:
            self._guard("flush", self._tracker.flush)

    def stop(self) -> None:
        if self._tracker is not None:
            tracker, self._tracker = self._tracker, None
            self._guard("stop", tracker.stop)
