"""The report's figures, one PNG each, drawn with matplotlib's file-only backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

from bigscience_train.report.run_data import RunData  # noqa: E402

PLOTS = ("loss", "learning_rate", "batch_size", "throughput", "grad_norm", "carbon")


def _figure(title: str, xlabel: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _column(records: list[dict], key: str) -> tuple[list, list]:
    kept = [r for r in records if key in r]
    return [r["consumed_tokens"] for r in kept], [r[key] for r in kept]


def _legend(ax, twin) -> None:
    """One legend for a plot with a second y-axis."""
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="best")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_loss(data: RunData, path: Path) -> Path:
    fig, ax = _figure("Loss", "consumed tokens", "loss")
    ax.plot(*_column(data.train, "loss"), label="train", lw=1)
    if data.valid:
        ax.plot(*_column(data.valid, "val_loss"), "o-", label="validation", ms=3)
    ax.legend()
    return _save(fig, path)


def plot_learning_rate(data: RunData, path: Path) -> Path:
    fig, ax = _figure("Learning rate", "consumed tokens", "lr")
    ax.plot(*_column(data.train, "lr"))
    return _save(fig, path)


def plot_batch_size(data: RunData, path: Path) -> Path:
    fig, ax = _figure("Global batch size (ramp-up)", "consumed tokens", "samples per step")
    ax.step(*_column(data.train, "batch_size"), where="post")
    return _save(fig, path)


def plot_throughput(data: RunData, path: Path) -> Path:
    fig, ax = _figure("Throughput", "step", "tokens/s (job)")
    steps = [r["step"] for r in data.train]
    ax.plot(steps, [r["tokens_per_s"] for r in data.train], color="tab:blue", label="tokens/s")
    mfu = ax.twinx()
    mfu.plot(steps, [r["mfu"] for r in data.train], color="tab:orange", label="MFU")
    mfu.set_ylabel("MFU")
    _legend(ax, mfu)
    return _save(fig, path)


def plot_grad_norm(data: RunData, path: Path) -> Path:
    fig, ax = _figure("Gradient norm (skipped steps marked)", "step", "grad norm")
    steps = [r["step"] for r in data.train]
    ax.plot(steps, [r["grad_norm"] for r in data.train], lw=1)
    skipped, before = [], 0
    for r in data.train:
        if r.get("skipped_steps", 0) > before:
            skipped.append(r["step"])
        before = r.get("skipped_steps", 0)
    for step in skipped:
        ax.axvline(step, color="red", alpha=0.4, lw=1)
    if skipped:
        ax.plot([], [], color="red", label=f"{len(skipped)} interval(s) with skipped or overflow steps")
        ax.legend()
    return _save(fig, path)


def plot_carbon(data: RunData, path: Path) -> Path:
    fig, ax = _figure("Energy and emissions (all nodes and jobs)", "time", "energy (kWh)")
    points = data.carbon.over_time()
    if not points:
        _empty(ax, "no carbon data (logging.carbon, needs the [carbon] extra)")
        return _save(fig, path)
    times = [p[0] for p in points]
    ax.plot(times, [p[1] for p in points], color="tab:green", label="kWh")
    co2 = ax.twinx()
    co2.plot(times, [p[2] for p in points], color="tab:gray", ls="--", label="kg CO2eq")
    co2.set_ylabel("kg CO2eq")
    fig.autofmt_xdate()
    _legend(ax, co2)
    return _save(fig, path)


def plot_eval(data: RunData, path: Path) -> Path:
    """Each task's metrics against training tokens (steps for results that do not record tokens)."""
    by_tokens = all(row["tokens"] is not None for row in data.evals)
    fig, ax = _figure("Zero-shot evaluation", "tokens" if by_tokens else "training step", "score")
    series: dict[str, list[tuple[int, float]]] = {}
    for row in data.evals:
        x = row["tokens"] if by_tokens else row["step"]
        series.setdefault(f"{row['task']} {row['metric']}", []).append((x, row["value"]))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=label)
    ax.legend(fontsize="small")
    return _save(fig, path)


def write_plots(data: RunData, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    makers = {
        "loss": plot_loss,
        "learning_rate": plot_learning_rate,
        "batch_size": plot_batch_size,
        "throughput": plot_throughput,
        "grad_norm": plot_grad_norm,
        "carbon": plot_carbon,
    }
    plots = {name: makers[name](data, out_dir / f"{name}.png") for name in PLOTS}
    if data.evals:
        plots["eval"] = plot_eval(data, out_dir / "eval.png")
    return plots
