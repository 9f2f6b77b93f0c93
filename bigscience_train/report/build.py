"""`bigscience report RUN`: RUN/report/index.html (self-contained: the figure inlined), the figure's SVG beside
it, and a one-screen summary for the terminal."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from bigscience_train.fsutil import atomic_write_text
from bigscience_train.report.plots import TITLES, write_figure
from bigscience_train.report.run_data import RunData, read_run


def summary_rows(data: RunData) -> list[tuple[str, str]]:
    """(label, value) pairs: the same numbers in the terminal and in the HTML."""
    rows = [("run", str(data.run_dir)), ("model", str(data.config.get("model", {}).get("name", "?")))]
    if data.train:
        last = data.train[-1]
        recent = data.train[-10:]
        rows += [
            ("step", f"{last['step']:,}"),
            ("tokens", f"{last['consumed_tokens']:,}"),
            ("train loss (last)", f"{last['loss']:.4f}"),
            ("tokens/s (last 10 logs)", f"{sum(r['tokens_per_s'] for r in recent) / len(recent):,.1f}"),
            ("MFU (last 10 logs)", f"{sum(r['mfu'] for r in recent) / len(recent):.3f}"),
            ("skipped steps", f"{last.get('skipped_steps', 0)}"),
        ]
        phases = [("data", "data_time"), ("forward+backward", "forward_backward_time")]
        phases += [("optimizer", "optimizer_time"), ("comm wait", "comm_wait")]
        if all(key in r for r in recent for _, key in phases):
            rows.append(
                (
                    "s per step (last 10 logs)",
                    ", ".join(
                        f"{name} {sum(r[key] for r in recent) / len(recent):.3g}" for name, key in phases
                    ),
                )
            )
        stragglers = [r for r in data.events if r["kind"] == "straggler"]
        if stragglers:
            worst = max(stragglers, key=lambda r: r["busy_time"] / r["median"])
            rows.append(
                (
                    "stragglers",
                    f"{len(stragglers)} logs; worst rank {worst['rank']} on {worst['node']} at step {worst['step']} "
                    f"({worst['busy_time'] / worst['median']:.2f}x the median busy time)",
                )
            )
        spikes = [r for r in data.events if r["kind"] == "spike"]
        if spikes:
            rows.append(
                ("loss spikes", ", ".join(f"step {r['step']} ({r['ratio']:.2f}x)" for r in spikes[-5:]))
            )
        # A range is announced again by each job that resumed inside it: listed once.
        skipped = {tuple(r["range"]): None for r in data.events if r["kind"] == "skip"}
        if skipped:
            rows.append(("skipped iterations", ", ".join(f"{a}-{b}" for a, b in skipped)))
    if data.valid:
        last = data.valid[-1]
        names = data.valid_sets()
        rows += [
            (
                "validation loss (last)" + (", weighted mean of the sets" if names else ""),
                f"{last['val_loss']:.4f}",
            ),
            ("validation perplexity (last)", f"{last['val_ppl']:.2f}"),
        ]
        rows += [
            (f"validation loss {name} (last)", f"{last[f'val_loss/{name}']:.4f}")
            for name in names
            if f"val_loss/{name}" in last
        ]
    c = data.carbon
    if c.runs:
        rows += [
            ("energy (codecarbon)", f"{c.energy_kwh:.6g} kWh"),
            ("emissions (codecarbon)", f"{c.emissions_kg:.6g} kg CO2eq"),
            ("carbon method", "; ".join(c.methods) or "codecarbon"),
            ("measured or estimated", _measured_text(c.measured)),
            ("grid intensity", f"{c.intensity_g_per_kwh:.4g} g CO2eq/kWh" if c.intensity_g_per_kwh else "?"),
            ("PUE", f"{c.pue:g}" if c.pue is not None else "?"),
            ("tracker runs (nodes x jobs)", f"{len(c.runs)} in {len(c.jobs)} job(s)"),
        ]
        if c.estimate_kwh is not None:
            rows += [
                ("energy (TDP estimate)", f"{c.estimate_kwh:.6g} kWh"),
                ("emissions (TDP estimate)", f"{c.estimate_kg:.6g} kg CO2eq"),
            ]
        rows.append(("TDP estimate method", c.estimate_note))
    else:
        rows.append(("carbon", "no codecarbon data in RUN/carbon"))
    return rows


def _measured_text(measured: bool | None) -> str:
    if measured is None:
        return "unknown"
    if measured:
        return "measured (RAPL/NVML counters)"
    return "estimated: this machine has no RAPL or NVML counters, codecarbon estimated power from TDP/load"


def summary_text(data: RunData) -> str:
    rows = summary_rows(data)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _stderr(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _eval_table(data: RunData) -> str:
    if not data.evals:
        return "<p>No evaluation results in RUN/eval/ yet.</p>"
    head = "<tr><th>step</th><th>task</th><th>metric</th><th>value</th><th>stderr</th></tr>"
    body = "".join(
        f"<tr><td>{r['step']}</td><td>{html.escape(r['task'])}</td><td>{html.escape(r['metric'])}</td>"
        f"<td>{r['value']:.4f}</td><td>{_stderr(r['stderr'])}</td></tr>"
        for r in data.evals
    )
    return f"<table>{head}{body}</table>"


def render_html(data: RunData, figure: Path, panels: list[str]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
        for label, value in summary_rows(data)
    )
    captions = "; ".join(TITLES[name] for name in panels)
    image = base64.b64encode(figure.read_bytes()).decode()
    figures = (
        f"<figure><img alt='{html.escape(captions)}' src='data:image/svg+xml;base64,{image}'>"
        f"<figcaption>{html.escape(captions)}</figcaption></figure>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run report: {html.escape(data.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ text-align: left; padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; }}
figure {{ margin: 0.5em 0; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>Run report: {html.escape(data.name)}</h1>
<h2>Summary</h2>
<table id="summary">{rows}</table>
<h2>Figures</h2>
{figures}
<h2>Evaluation</h2>
{_eval_table(data)}
</body></html>
"""


def build_report(run_dir: Path) -> tuple[Path, str]:
    """Writes RUN/report/ and returns (index.html, terminal summary)."""
    data = read_run(Path(run_dir))
    out = Path(run_dir) / "report"
    figure, panels = write_figure(data, out)
    index = out / "index.html"
    atomic_write_text(index, render_html(data, figure, panels))
    return index, summary_text(data)
