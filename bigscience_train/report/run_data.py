"""What a run directory holds, read for the report: metrics, config, carbon totals, evaluation results.

Works on a run still going (it reads what is there) and on a chain of jobs: metrics.jsonl is appended by each
job, and a job that resumed from an earlier checkpoint logs some steps again; the last record of each
(kind, step) is the one kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from bigscience_train.carbon.aggregate import CarbonTotals, carbon_totals
from bigscience_train.plan.hardware import DEVICES


@dataclass
class RunData:
    run_dir: Path
    name: str
    config: dict
    train: list[dict]
    valid: list[dict]
    carbon: CarbonTotals
    evals: list[dict]  # {"step", "tokens", "task", "metric", "value", "stderr"}
    # What the trainer noticed or did: loss spikes, stragglers, rollbacks, skipped iterations (metrics.jsonl
    # records of those kinds).
    events: list[dict]

    def valid_sets(self) -> list[str]:
        """The named validation sets (data.valid) the valid records hold a val_loss/<name> for, in order."""
        names = {key.split("/", 1)[1]: None for r in self.valid for key in r if key.startswith("val_loss/")}
        return list(names)


EVENTS = ("spike", "straggler", "rollback", "skip")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not a run directory, or no step logged yet")
    latest: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written when a job was killed
        latest[(record["kind"], record["step"])] = record
    records = sorted(latest.values(), key=lambda r: r["step"])
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    return train, valid, [r for r in records if r["kind"] in EVENTS]


def read_evals(run_dir: Path) -> list[dict]:
    """lm-eval result files under RUN/eval/step_N/ (results.json), flattened into table rows."""
    rows = []
    for path in sorted((Path(run_dir) / "eval").glob("step_*/results.json")):
        data = json.loads(path.read_text())
        step = int(path.parent.name.split("_")[1])
        for task, metrics in data.get("results", {}).items():
            for key, value in metrics.items():
                metric = key.split(",")[0]
                if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
                rows.append(
                    {
                        "step": step,
                        "tokens": data.get("consumed_tokens"),
                        "task": task,
                        "metric": metric,
                        "value": value,
                        "stderr": stderr if isinstance(stderr, (int, float)) else None,
                    }
                )
    return rows


def read_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    train, valid, events = read_metrics(run_dir)
    config_path = run_dir / "config.yaml"
    config: dict = {}
    if config_path.is_file():
        # libyaml's safe loader gives OmegaConf's dict (interpolations as written) without OmegaConf's import.
        config = yaml.load(config_path.read_text(), Loader=yaml.CSafeLoader) or {}
    cluster = config.get("cluster", {})
    device = DEVICES.get(cluster.get("device", ""))
    tdp = cluster.get("tdp_watts") or (device.tdp_watts if device else None)
    carbon = carbon_totals(run_dir, tdp, cluster.get("pue"), cluster.get("carbon_intensity"))
    return RunData(
        run_dir, config.get("name", run_dir.name), config, train, valid, carbon, read_evals(run_dir), events
    )
