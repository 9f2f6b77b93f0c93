"""BigScience's published training runs, the planner's predictions of them, and the calibration fit.

published_runs.yaml holds the runs table by table as the files of github.com/bigscience-workshop/bigscience
give them: each is what `bigscience plan <overrides>` is asked for that layout, with what the source
published: seconds per iteration, TFLOP/s per GPU (in the source's own counting), memory per GPU. `fitted`
runs chose plan.hardware's calibration, the others are held out; an `excluded` run is shown, not claimed, for
the reason it gives (an outlier against its own table, a head-count trial the model does not price), and a
config the trainer rejects (layers that do not split evenly over the stages) is shown with the problem.

    python -m bigscience_train.plan.published           the markdown tables of docs/planner.md
    python -m bigscience_train.plan.published --fit     each device class refitted on its fitted runs

Predicted TFLOP/s are in the source's counting: published TFLOP/s x published s / predicted s when both were
published, else the planner's own (Megatron's formula with recompute, which BLOOM's logs used).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from bigscience_train.config import cluster_world_size, config_problems, load_config
from bigscience_train.config.validate import NO_END
from bigscience_train.plan.estimate import Plan, layout_of, make_plan
from bigscience_train.plan.hardware import DEVICES, Calibration
from bigscience_train.plan.memory import GIB
from bigscience_train.plan.throughput import estimate_time

REPO = "bigscience-workshop/bigscience"
RUNS_FILE = Path(__file__).with_name("published_runs.yaml")
TOLERANCE = 0.15
HEADS_TRIAL = (
    "head-count trial: the source saw the attention kernels' choice move throughput up to 40% with NHEADS"
)
LAYOUT_FIELDS = ("tp", "pp", "dp", "mbs", "gbs", "layers", "hidden", "heads")
ROW_FIELDS = (
    *LAYOUT_FIELDS,
    "seconds",
    "tflops",
    "memory_gb",
    "name",
    "section",
    "note",
    "fitted",
    "excluded",
)
ROW_FIELDS += ("heads_trial",)
SHAPE_KEYS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_heads"}


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str  # a file of REPO
    section: str
    overrides: tuple[str, ...]
    seconds: float | None = None
    tflops: float | None = None
    memory_gb: float | None = None
    fitted: bool = False
    excluded: str | None = None
    note: str = ""

    @property
    def device(self) -> str:
        return "a100" if "cluster=jean_zay_a100" in self.overrides else "v100"

    @property
    def global_batch(self) -> int:
        return next(int(o.split("=")[1]) for o in self.overrides if o.startswith("train.global_batch_size="))


def _flat(items) -> Iterator[str]:
    for item in items:
        yield from _flat(item) if isinstance(item, list) else (str(item),)


def _groups(overrides) -> tuple[str, ...]:
    """The preset choices (model=..., cluster=...) among overrides."""
    return tuple(o for o in overrides if "." not in o.split("=", 1)[0])


@functools.cache
def _preset(groups: tuple[str, ...]):
    return load_config(list(groups))


def run_config(overrides: tuple[str, ...]):
    """load_config(overrides), composing each set of preset choices once and setting the dotted overrides on
    a copy: the values Hydra would set (tests compare the two)."""
    cfg = copy.deepcopy(_preset(_groups(overrides)))
    for override in overrides:
        key, value = override.split("=", 1)
        if "." in key:
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    return cfg


def _name(table: dict, row: dict, f: dict) -> str:
    if "name" in f:
        return f["name"]
    shape = f" {f['layers']}x{f['hidden']}" if "layers" in row else ""
    heads = f" a{f['heads']}" if "heads" in row else ""
    return f"{table['label']}{shape} TP{f['tp']} PP{f['pp']} DP{f['dp']} MBS{f['mbs']} GBS{f['gbs']}{heads}"


def _run(table: dict, row: dict) -> PublishedRun:
    f = {k: v for k, v in table.items() if k in ROW_FIELDS} | row
    unknown = set(f) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"{RUNS_FILE}: unknown fields {sorted(unknown)} in a row of {table['source']}")
    missing = [k for k in ("tp", "pp", "dp", "mbs", "gbs", "section") if k not in f]
    if missing:
        raise ValueError(f"{RUNS_FILE}: a row of {table['source']} ({row}) lacks {', '.join(missing)}")
    base = tuple(_flat(table["overrides"]))
    procs_per_node = _preset(_groups(base)).cluster.procs_per_node
    overrides = (
        *base,
        *(f"model.{key}={f[field]}" for field, key in SHAPE_KEYS.items() if field in f),
        f"cluster.nodes={f['tp'] * f['pp'] * f['dp'] // procs_per_node}",
        f"parallel.tp={f['tp']}",
        f"parallel.pp={f['pp']}",
        f"train.micro_batch_size={f['mbs']}",
        f"train.global_batch_size={f['gbs']}",
    )
    trial = f.get("heads_trial") and f["heads"] != table["heads"]
    return PublishedRun(
        _name(table, row, f),
        table["source"],
        f["section"],
        overrides,
        f.get("seconds"),
        f.get("tflops"),
        f.get("memory_gb"),
        bool(f.get("fitted")),
        f.get("excluded") or (HEADS_TRIAL if trial else None),
        f.get("note") or "",
    )


def published_runs(path: Path = RUNS_FILE) -> list[PublishedRun]:
    runs = []
    for table in yaml.safe_load(path.read_text())["tables"]:
        for row in table["rows"]:
            fields = row if isinstance(row, dict) else dict(zip(table["columns"], row, strict=True))
            runs.append(_run(table, {k: v for k, v in fields.items() if v is not None}))
    return runs


@dataclass(frozen=True)
class Comparison:
    run: PublishedRun
    cfg: object  # the run's RunConfig
    plan: Plan | None  # None: a config the trainer rejects
    problems: tuple[str, ...] = ()

    @property
    def published_seconds(self) -> float:
        """As published, or from published TFLOP/s in the planner's (Megatron's) counting."""
        if self.run.seconds is not None:
            return self.run.seconds
        return self.plan.time.hardware_flops / (self.run.tflops * 1e12 * self.plan.world)

    @property
    def seconds(self) -> float:
        return self.plan.time.iteration

    @property
    def tflops(self) -> float:
        if self.run.seconds is not None and self.run.tflops is not None:
            return self.run.tflops * self.run.seconds / self.seconds
        return self.plan.tflops_per_device(hardware=True)

    @property
    def memory_gb(self) -> float:
        return self.plan.memory.peak / GIB

    def errors(self) -> dict[str, float]:
        """Relative errors of the throughput figures the source published."""
        found = {}
        if self.run.seconds is not None:
            found["s/it"] = self.seconds / self.run.seconds - 1
        if self.run.tflops is not None:
            found["TFLOP/s"] = self.tflops / self.run.tflops - 1
        return found

    @property
    def memory_error(self) -> float | None:
        return None if self.run.memory_gb is None else self.memory_gb / self.run.memory_gb - 1

    @property
    def claimed(self) -> bool:
        return self.run.excluded is None and self.plan is not None


def compare(run: PublishedRun) -> Comparison:
    # Plain dataclasses: the fit evaluates each run thousands of times, 30x faster than through a DictConfig.
    cfg = OmegaConf.to_object(run_config(run.overrides))
    problems = tuple(p for p in config_problems(cfg, cluster_world_size(cfg.cluster)) if p != NO_END)
    return Comparison(run, cfg, None if problems else make_plan(cfg, layout_of(cfg)), problems)


@functools.cache
def comparisons() -> tuple[Comparison, ...]:
    return tuple(compare(run) for run in published_runs())


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _percent(error: float | None) -> str:
    return "" if error is None else f"{error:+.1%}"


def _status(c: Comparison) -> str:
    if c.plan is None:
        return "not a layout the trainer builds: " + "; ".join(c.problems)
    if c.run.excluded:
        return f"excluded: {c.run.excluded}"
    return "fitted" if c.run.fitted else "held out"


def _row(c: Comparison) -> list[str]:
    run = c.run
    source = f"[{run.source}](https://github.com/{REPO}/blob/master/{run.source}): {run.section}"
    name = f"{run.name} ({run.note})" if run.note else run.name
    published = [_cell(run.seconds, ".2f"), _cell(run.tflops, ".2f"), _cell(run.memory_gb, "g")]
    if c.plan is None:
        return [
            name,
            source,
            "",
            published[0],
            "",
            "",
            published[1],
            "",
            "",
            published[2],
            "",
            "",
            _status(c),
        ]
    d, errors = c.plan.layout.dims, c.errors()
    layout = f"TP{d.tp} PP{d.pp} DP{d.dp}, MBS {c.plan.layout.micro_batch}, GBS {run.global_batch}"
    return [
        name,
        source,
        f"{layout}, {c.plan.world} {run.device.upper()}",
        published[0],
        f"{c.seconds:.2f}",
        _percent(errors.get("s/it")),
        published[1],
        f"{c.tflops:.1f}",
        _percent(errors.get("TFLOP/s")),
        published[2],
        f"{c.memory_gb:.1f}",
        _percent(c.memory_error),
        _status(c),
    ]


def summary_table(rows: tuple[Comparison, ...]) -> str:
    """Per device class and set: how many runs, and their largest and RMS error over published figures."""
    lines = ["| device | set | runs | largest error | RMS error |", "|---|---|---|---|---|"]
    for device in FITTED:
        for label, fitted in (("fitted", True), ("held out", False)):
            errors = [
                e
                for c in rows
                if c.claimed and c.run.device == device and c.run.fitted == fitted
                for e in c.errors().values()
            ]
            count = sum(1 for c in rows if c.claimed and c.run.device == device and c.run.fitted == fitted)
            rms = math.sqrt(sum(e * e for e in errors) / len(errors))
            lines.append(
                f"| {device.upper()} | {label} | {count} | {max(map(abs, errors)):.1%} | {rms:.1%} |"
            )
    unclaimed = sum(1 for c in rows if not c.claimed)
    lines.append(f"| | shown, not claimed | {unclaimed} | | |")
    return "\n".join(lines)


def markdown_table(rows: tuple[Comparison, ...]) -> str:
    header = ["run", "source", "layout", "s/it published", "s/it predicted", "error", "TFLOP/s published"]
    header += ["TFLOP/s predicted", "error", "memory GB published", "memory GiB predicted", "error", "set"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_row(c)) + " |" for c in rows]
    return "\n".join(lines)


# The constants each device class fits; V100's network efficiency is measured.
FITTED = {
    "v100": ("max_efficiency", "width_half", "tokens_half", "latency"),
    "a100": ("max_efficiency", "width_half", "tokens_half", "latency", "network"),
}


def _with(calibration: Calibration, name: str, value: float) -> Calibration:
    """`calibration` with one constant replaced; `network` is a single point, for every job size."""
    return dataclasses.replace(calibration, **{name: ((1, value),) if name == "network" else value})


def _value(calibration: Calibration, name: str) -> float:
    return calibration.network[0][1] if name == "network" else getattr(calibration, name)


def fit_loss(device: str, calibration: Calibration) -> float:
    """Sum of squared log errors of the predicted s/it over the device class's fitted runs."""
    total = 0.0
    for c in comparisons():
        if c.run.fitted and c.claimed and c.run.device == device:
            params = c.plan.memory.parameters_per_rank
            time = estimate_time(c.cfg, c.plan.layout, c.run.global_batch, params, calibration)
            total += math.log(time.iteration / c.published_seconds) ** 2
    return total


def fit_calibration(device: str, start: Calibration | None = None, tolerance: float = 1e-4) -> Calibration:
    """Pattern search on fit_loss over FITTED[device]: each constant moved by +-step (relative), the step
    halved when no move lowers the loss, until it is below `tolerance`."""
    best = start or DEVICES[device].calibration
    loss, step = fit_loss(device, best), 0.2
    while step > tolerance:
        moved = False
        for name in FITTED[device]:
            for sign in (1, -1):
                value = _value(best, name) * (1 + sign * step)
                if name == "max_efficiency" and value > 1:
                    continue
                candidate = _with(best, name, value)
                trial = fit_loss(device, candidate)
                if trial < loss:
                    best, loss, moved = candidate, trial, True
        if not moved:
            step /= 2
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bigscience_train.plan.published", description=__doc__)
    parser.add_argument("--fit", action="store_true", help="refit each device class on its fitted runs")
    args = parser.parse_args(argv)
    if args.fit:
        for device in FITTED:
            print(device, fit_calibration(device))
        return 0
    print(summary_table(comparisons()), markdown_table(comparisons()), sep="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
