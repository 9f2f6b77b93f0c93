"""The report's figure: every panel in one matplotlib Figure, saved once, as SVG.

SVG with its text kept as text: that skips rasterising glyphs and encoding a PNG, the slowest part of saving.
No pyplot (its import and figure manager cost more than the drawing) and no tight or constrained layout (each
lays out the whole figure again); the margins are fixed, in inches, instead.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.dates import ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bigscience_train.report.run_data import RunData

FIGURE = "figures.svg"
TITLES = {
    "loss": "Training and validation loss",
    "learning_rate": "Learning rate",
    "batch_size": "Global batch size (ramp-up)",
    "throughput": "Tokens/s and MFU",
    "grad_norm": "Gradient norm (skipped steps marked)",
    "carbon": "Energy and CO2 (all nodes and jobs)",
    "eval": "Zero-shot evaluation scores",
}
PANELS = ("loss", "learning_rate", "batch_size", "throughput", "grad_norm", "carbon")
COLUMNS = 2
PANEL_INCHES = (7.0, 4.0)
# Ticks per axis at most: matplotlib's tick and label objects are most of the drawing time.
TICKS = 6
# A panel's plot area is about 600 pixels wide on screen: two points per pixel column draw what thousands do.
MAX_POINTS = 1200


def decimate(x: list, y: list, max_points: int = MAX_POINTS) -> tuple[list, list]:
    """The points of a line to draw: all of them up to max_points, else the first, the last and each bucket's
    lowest and highest, in order, so that spikes stay visible. For drawing only: the report's text keeps
    the exact values."""
    if len(y) <= max_points:
        return list(x), list(y)
    values = np.asarray(y, dtype=float)
    keep = {0, len(values) - 1}
    for bucket in np.array_split(np.arange(len(values)), max_points // 2):
        keep.update((int(bucket[values[bucket].argmin()]), int(bucket[values[bucket].argmax()])))
    order = sorted(keep)
    return [x[i] for i in order], [y[i] for i in order]


def _column(records: list[dict], key: str, along: str = "consumed_tokens") -> tuple[list, list]:
    kept = [r for r in records if key in r]
    return decimate([r[along] for r in kept], [r[key] for r in kept])


def _legend(ax, twin) -> None:
    """One legend for a panel with a second y-axis."""
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="best")


def _empty(ax, text: str) -> None:
    """A panel with nothing to draw: its message and no ticks, which would only show matplotlib's 0 to 1."""
    ax.set(xticks=[], yticks=[])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_loss(data: RunData, ax) -> None:
    ax.set(xlabel="consumed tokens", ylabel="loss")
    ax.plot(*_column(data.train, "loss"), label="train", lw=1)
    if data.valid:
        names = data.valid_sets()
        label = "validation (weighted mean)" if names else "validation"
        ax.plot(*_column(data.valid, "val_loss"), "o-", label=label, ms=3)
        for name in names:
            ax.plot(*_column(data.valid, f"val_loss/{name}"), ".--", label=f"validation: {name}", ms=3, lw=1)
    ax.legend()


def plot_learning_rate(data: RunData, ax) -> None:
    ax.set(xlabel="consumed tokens", ylabel="lr")
    ax.plot(*_column(data.train, "lr"))


def plot_batch_size(data: RunData, ax) -> None:
    ax.set(xlabel="consumed tokens", ylabel="samples per step")
    ax.step(*_column(data.train, "batch_size"), where="post")


def plot_throughput(data: RunData, ax) -> None:
    ax.set(xlabel="step", ylabel="tokens/s (job)")
    ax.plot(*_column(data.train, "tokens_per_s", "step"), color="tab:blue", label="tokens/s")
    mfu = ax.twinx()
    mfu.plot(*_column(data.train, "mfu", "step"), color="tab:orange", label="MFU")
    mfu.set_ylabel("MFU")
    _legend(ax, mfu)


def plot_grad_norm(data: RunData, ax) -> None:
    ax.set(xlabel="step", ylabel="grad norm")
    ax.plot(*_column(data.train, "grad_norm", "step"), lw=1)
    skipped, before = [], 0
    for r in data.train:
        if r.get("skipped_steps", 0) > before:
            skipped.append(r["step"])
        before = r.get("skipped_steps", 0)
    if skipped:
        ax.vlines(
            skipped,
            0,
            1,
            transform=ax.get_xaxis_transform(),
            color="red",
            alpha=0.4,
            lw=1,
            label=f"{len(skipped)} interval(s) with skipped or overflow steps",
        )
        ax.legend()


def plot_carbon(data: RunData, ax) -> None:
    ax.set(xlabel="time", ylabel="energy (kWh)")
    points = data.carbon.over_time()
    if not points:
        _empty(ax, "no carbon data (logging.carbon, needs the [carbon] extra)")
        return
    times = [p[0] for p in points]
    ax.plot(*decimate(times, [p[1] for p in points]), color="tab:green", label="kWh")
    co2 = ax.twinx()
    co2.plot(*decimate(times, [p[2] for p in points]), color="tab:gray", ls="--", label="kg CO2eq")
    co2.set_ylabel("kg CO2eq")
    ax.xaxis.set_major_formatter(ConciseDateFormatter(ax.xaxis.get_major_locator()))
    _legend(ax, co2)


def plot_eval(data: RunData, ax) -> None:
    """Each task's metrics against training tokens (steps for results that do not record tokens)."""
    by_tokens = all(row["tokens"] is not None for row in data.evals)
    ax.set(xlabel="tokens" if by_tokens else "training step", ylabel="score")
    series: dict[str, list[tuple[int, float]]] = {}
    for row in data.evals:
        x = row["tokens"] if by_tokens else row["step"]
        series.setdefault(f"{row['task']} {row['metric']}", []).append((x, row["value"]))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=label)
    ax.legend(fontsize="small")


MAKERS = {
    "loss": plot_loss,
    "learning_rate": plot_learning_rate,
    "batch_size": plot_batch_size,
    "throughput": plot_throughput,
    "grad_norm": plot_grad_norm,
    "carbon": plot_carbon,
    "eval": plot_eval,
}


def panels(data: RunData) -> list[str]:
    return [*PANELS, "eval"] if data.evals else list(PANELS)


def write_figure(data: RunData, out_dir: Path) -> tuple[Path, list[str]]:
    """Draws the run's panels, COLUMNS to a row, into out_dir/FIGURE; returns it and the panels it holds."""
    names = panels(data)
    rows = -(-len(names) // COLUMNS)
    width, height = PANEL_INCHES
    fig = Figure(figsize=(COLUMNS * width, rows * height))
    FigureCanvasSVG(fig)
    # Room for tick labels and axis labels on both sides (twin axes) and for each panel's title.
    fig.subplots_adjust(
        left=0.9 / (COLUMNS * width),
        right=1 - 0.8 / (COLUMNS * width),
        bottom=0.6 / (rows * height),
        top=1 - 0.4 / (rows * height),
        wspace=0.35,
        hspace=0.45,
    )
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, COLUMNS, i + 1)
        # y given: matplotlib then does not measure the panel's decorations to place the title.
        ax.set_title(TITLES[name], y=1.0)
        ax.grid(alpha=0.3)
        MAKERS[name](data, ax)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_locator(), MaxNLocator):
                axis.get_major_locator().set_params(nbins=TICKS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FIGURE
    # No date in the metadata: the same run gives the same file.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(path, format="svg", metadata={"Date": None})
    return path, names
