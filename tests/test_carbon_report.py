"""Carbon accounting (codecarbon per node, summed per run), W&B offline logging, and the run report."""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from bigscience_train.carbon.aggregate import carbon_totals
from bigscience_train.carbon.tracker import NodeTracker
from bigscience_train.report.build import build_report, summary_rows
from bigscience_train.report.plots import FIGURE, PANELS, TITLES, decimate
from bigscience_train.report.run_data import read_run
from tests.conftest import ROOT, data_overrides
from tests.test_train import FAST, train

# codecarbon 3.x's CSV header, as its tracker writes it.
COLUMNS = [
    "timestamp",
    "project_name",
    "run_id",
    "experiment_id",
    "duration",
    "emissions",
    "emissions_rate",
    "cpu_power",
    "gpu_power",
    "ram_power",
    "cpu_energy",
    "gpu_energy",
    "ram_energy",
    "energy_consumed",
    "water_consumed",
    "country_name",
    "country_iso_code",
    "region",
    "cloud_provider",
    "cloud_region",
    "os",
    "python_version",
    "codecarbon_version",
    "cpu_count",
    "cpu_model",
    "gpu_count",
    "gpu_model",
    "longitude",
    "latitude",
    "ram_total_size",
    "tracking_mode",
    "cpu_utilization_percent",
    "gpu_utilization_percent",
    "ram_utilization_percent",
    "ram_used_gb",
    "on_cloud",
    "pue",
    "wue",
]


def write_codecarbon_csv(path: Path, runs: dict[str, list[tuple[str, float, float, float]]]) -> None:
    """runs: run_id -> cumulative rows (timestamp, duration s, energy kWh, emissions kg)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for run_id, rows in runs.items():
            for when, duration, energy, kg in rows:
                row = dict.fromkeys(COLUMNS, "")
                row.update(
                    timestamp=when,
                    project_name="codecarbon",
                    run_id=run_id,
                    duration=duration,
                    emissions=kg,
                    energy_consumed=energy,
                    country_iso_code="FRA",
                    gpu_count=4,
                    tracking_mode="machine",
                    pue=1.2,
                )
                writer.writerow(row)
        f.write("2026-11-22T10:00:00,codecarbon,cut-short")  # the row a killed job was writing


def synthetic_run(run_dir: Path) -> None:
    """A chain of two jobs on two nodes each; the second node of job 2 ran two trackers (two runs)."""
    carbon = run_dir / "carbon"
    carbon.mkdir(parents=True)
    write_codecarbon_csv(
        carbon / "emissions-job100-node000.csv",
        {"a": [("2026-11-22T08:00:00", 1800, 1.0, 0.057), ("2026-11-22T08:30:00", 3600, 2.0, 0.114)]},
    )
    write_codecarbon_csv(
        carbon / "emissions-job100-node001.csv",
        {"b": [("2026-11-22T08:00:00", 1800, 1.5, 0.0855), ("2026-11-22T08:30:00", 3600, 3.0, 0.171)]},
    )
    write_codecarbon_csv(
        carbon / "emissions-job101-node000.csv", {"c": [("2026-11-22T09:30:00", 1800, 0.5, 0.0285)]}
    )
    write_codecarbon_csv(
        carbon / "emissions-job101-node001.csv",
        {
            "d": [("2026-11-22T09:00:00", 900, 0.25, 0.01425)],
            "e": [("2026-11-22T09:30:00", 900, 0.25, 0.01425)],
        },
    )
    step = run_dir / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"layout": {"tp": 2, "pp": 1, "dp": 4}}))
    (run_dir / "checkpoints" / "latest").write_text("step_0000010\n")


def test_totals_sum_the_last_row_of_every_tracker_run_over_nodes_and_jobs(tmp_path):
    synthetic_run(tmp_path)
    totals = carbon_totals(tmp_path, tdp_watts=300.0, pue=1.2, intensity=57.0)
    assert len(totals.runs) == 5 and totals.jobs == ["100", "101"]
    assert totals.energy_kwh == pytest.approx(2.0 + 3.0 + 0.5 + 0.25 + 0.25)
    assert totals.emissions_kg == pytest.approx(0.114 + 0.171 + 0.0285 + 0.01425 + 0.01425)
    # World 8 over 2 nodes: 4 devices per node. Device-hours: 4 x (1 + 1 + 0.5 + 0.25 + 0.25) = 12.
    assert totals.estimate_kwh == pytest.approx(12 * 300 * 1.2 / 1000)
    assert totals.estimate_kg == pytest.approx(totals.estimate_kwh * 57 / 1000)
    final = totals.over_time()[-1]
    assert final[1] == pytest.approx(totals.energy_kwh) and final[2] == pytest.approx(totals.emissions_kg)


def test_one_tracker_per_node_under_four_processes(tiny_data, tmp_path):
    """Two torchrun agents on this machine act as two nodes of two ranks each."""
    run = tmp_path / "run"
    overrides = [*FAST, *data_overrides(tiny_data, run), "train.iters=4", "checkpoint.interval=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=2",
                f"--node-rank={node}",
                "--rdzv-backend=static",
                "--master-addr=127.0.0.1",
                "--master-port=29731",
                "-m",
                "bigscience_train.train",
                *overrides,
                "logging.carbon=true",
                "logging.carbon_interval_s=1",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outputs
    files = sorted(p.name for p in (run / "carbon").glob("emissions-*.csv"))
    assert files == ["emissions-joblocal-node000.csv", "emissions-joblocal-node001.csv"]
    for name in files:
        rows = list(csv.DictReader((run / "carbon" / name).open()))
        assert len({r["run_id"] for r in rows}) == 1  # one tracker on the node, not one per rank
    totals = carbon_totals(run, None, None, None)
    assert len(totals.runs) == 2 and totals.energy_kwh > 0
    assert any(
        json.loads(line)["kind"] == "carbon" for line in (run / "metrics.jsonl").read_text().splitlines()
    )


def test_a_failing_tracker_never_stops_training(tiny_data, tmp_path, monkeypatch, capsys):
    import codecarbon

    class Broken:
        def __init__(self, **kwargs):
            pass

        def start(self):
            pass

        def flush(self):
            raise OSError("disk full")

        def stop(self):
            raise AssertionError("stop() must not run once the tracker is off")

    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", Broken)
    result = train(tiny_data, tmp_path / "r", "train.iters=4", "checkpoint.interval=2", "logging.carbon=true")
    assert result.state.step == 4
    err = capsys.readouterr().err
    assert err.count("carbon tracking off") == 1 and "disk full" in err


def test_a_stale_codecarbon_lock_does_not_block_the_next_job(tmp_path):
    from codecarbon.lock import LOCKFILE

    Path(LOCKFILE).touch()
    try:
        cluster = type("C", (), {"country_iso_code": "FRA", "pue": 1.2, "carbon_intensity": 57.0})()
        tracker = NodeTracker(tmp_path, cluster, interval_s=1.0, gpu_ids=[])
        tracker.flush()
        tracker.stop()
    finally:
        Path(LOCKFILE).unlink(missing_ok=True)
    assert list((tmp_path / "carbon").glob("emissions-*.csv"))
    info = json.loads(next((tmp_path / "carbon").glob("node-*.json")).read_text())
    assert info["forced_carbon_intensity"] == 57.0 and "method" in info


def test_a_long_line_is_drawn_from_its_ends_and_each_buckets_extremes():
    x = list(range(10_000))
    y = [1.0] * 10_000
    y[777], y[4321] = -3.0, 50.0
    drawn_x, drawn_y = decimate(x, y, max_points=1000)
    assert len(drawn_x) <= 1002 and drawn_x == sorted(drawn_x)
    assert (drawn_x[0], drawn_x[-1]) == (0, 9_999)
    assert {(777, -3.0), (4321, 50.0)} <= set(zip(drawn_x, drawn_y, strict=True))
    assert decimate(x[:1000], y[:1000], max_points=1000) == (x[:1000], y[:1000])


def test_report_of_a_finished_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(
        tiny_data,
        run,
        "train.iters=12",
        "train.rampup_batch_size=[4,4,32]",
        "checkpoint.interval=4",
        "logging.carbon=true",
        "logging.carbon_interval_s=1",
        "logging.wandb=true",
        "precision=fp16",
    )
    index, summary = build_report(run)
    figure = run / "report" / FIGURE
    # The SVG keeps its text as text: each panel's title, axis labels and legends, and carbon drawn as data.
    texts = {t.text or "" for t in ElementTree.parse(figure).iter("{http://www.w3.org/2000/svg}text")}
    assert {TITLES[name] for name in PANELS} <= texts
    assert {"consumed tokens", "train", "validation", "MFU", "kg CO2eq"} <= texts
    assert not any(t.startswith("no carbon data") for t in texts)
    page = index.read_text()
    assert f"data:image/svg+xml;base64,{base64.b64encode(figure.read_bytes()).decode()}" in page
    assert "<img src='http" not in page
    data = read_run(run)
    assert data.carbon.energy_kwh > 0 and data.carbon.measured is False
    for label, value in summary_rows(data):
        assert f"<th>{html.escape(label)}</th><td>{html.escape(value)}</td>" in page
        assert value in summary
    assert f"{data.carbon.energy_kwh:.6g} kWh" in page and "estimated" in page
    # W&B offline: a run directory to `wandb sync` later, holding the logged history.
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
