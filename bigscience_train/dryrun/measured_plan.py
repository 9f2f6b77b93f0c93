"""`bigscience plan --measure`: one rank of the job measured (rank_step.py) beside what the planner predicts for
it, memory kind by kind and traffic dimension by dimension."""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass

from bigscience_train.plan.communication import stage_traffic
from bigscience_train.plan.estimate import MEMORY_MARGIN, layout_of, make_plan
from bigscience_train.plan.memory import GIB, MEASURED_KINDS, stage_memory

MODES = ("auto", "real", "fake")


@dataclass
class Row:
    name: str
    predicted: float
    measured: float

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured; None where nothing was measured."""
        return (self.predicted - self.measured) / self.measured if self.measured else None


def compare(cfg, measurement: dict) -> dict[str, list[Row]]:
    """The planner's prediction for the measured rank's pipeline stage beside what it measured."""
    layout = layout_of(cfg)
    stage = measurement["coords"]["pp"]
    estimate = stage_memory(cfg, layout, cfg.train.global_batch_size, stage)
    memory = [
        Row(kind, sum(estimate.terms.get(t, 0.0) for t in terms), measurement["memory"].get(kind, 0))
        for kind, terms in MEASURED_KINDS.items()
    ]
    memory.append(Row("activations", estimate.transient, measurement["memory"].get("activations", 0)))
    memory.append(Row("peak", estimate.peak, measurement["peak"]))
    predicted = stage_traffic(cfg, layout, cfg.train.global_batch_size, stage)
    measured = {dim: sum(b for _, b in kinds.values()) for dim, kinds in measurement["collectives"].items()}
    dims = [d for d in ("dp", "tp", "pp") if d in predicted or d in measured]
    traffic = [Row(d, predicted.get(d, 0.0), measured.get(d, 0)) for d in dims]
    return {"memory": memory, "traffic": traffic}


def _measure_in_child(overrides: list[str], rank: int, fake: bool, shorten: bool, queue) -> None:
    from bigscience_train.config import load_config
    from bigscience_train.dryrun.rank_step import measure_rank

    try:
        queue.put(measure_rank(load_config(overrides), rank, fake, shorten).to_dict())
    except BaseException as e:
        queue.put(e)
        raise


def measure(overrides: list[str], rank: int, fake: bool, shorten: bool = True) -> dict:
    """One rank measured in a process of its own: a process is one rank of one process group (DeviceMesh
    keeps its groups in process-wide caches), and frees everything it built when it ends. `shorten`: on
    fewer micro-batches where that measures the same (rank_step.equivalent_micro_batches)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_measure_in_child, args=(overrides, rank, fake, shorten, queue))
    child.start()
    result = queue.get()
    child.join()
    if isinstance(result, BaseException):
        raise RuntimeError(f"measuring rank {rank} failed: {result}") from result
    return result


def measure_plan(
    cfg, overrides: list[str], ranks: list[int] | None, mode: str, shorten: bool = True
) -> list[dict]:
    """Each rank of the job `overrides` configure (`cfg`) measured and compared; ranks None: the heaviest
    (first and last pipeline stage)."""
    from bigscience_train.dryrun.rank_step import fits_for_real, heaviest_ranks, rank_coords

    layout = layout_of(cfg)
    dims = layout.dims
    for rank in ranks or []:
        if not 0 <= rank < dims.world_size:
            raise ValueError(f"--rank {rank} is not a rank of {dims} ({dims.world_size} ranks)")
    results = []
    for rank in ranks or heaviest_ranks(dims):
        stage = rank_coords(dims, rank)["pp"]
        predicted_peak = stage_memory(cfg, layout, cfg.train.global_batch_size, stage).peak
        fake = mode == "fake" or (mode == "auto" and not fits_for_real(cfg, dims, predicted_peak))
        measurement = measure(overrides, rank, fake, shorten)
        rows = compare(cfg, measurement)
        results.append(
            {
                "measurement": measurement,
                "memory": [_row_dict(r) for r in rows["memory"]],
                "traffic": [_row_dict(r) for r in rows["traffic"]],
            }
        )
    return results


def _row_dict(row: Row) -> dict:
    return {"name": row.name, "predicted": row.predicted, "measured": row.measured, "error": row.error}


def _error(e: float | None) -> str:
    return "" if e is None else f"{100 * e:+.0f}%"


def format_measured(results: list[dict]) -> str:
    lines = []
    for result in results:
        m = result["measurement"]
        coords = " ".join(f"{d}={i}" for d, i in m["coords"].items())
        lines.append(
            f"rank {m['rank']} ({coords}; stages {m['stages']}), {m['mode']}: built in {m['build_seconds']:.1f} s "
            f"(peak {m['build_peak'] / GIB:.2f} GiB), one step in {m['step_seconds']:.1f} s "
            f"({m['micro_batches_run'][0]} of its {m['micro_batches']} micro-batches)"
        )
        unit, scale = ("GiB", GIB) if m["peak"] >= 0.5 * GIB else ("MiB", 2**20)
        lines.append(f"  {f'memory ({unit})':<22}{'predicted':>10}{'measured':>10}{'error':>8}")
        for row in result["memory"]:
            lines.append(
                f"  {row['name']:<22}{row['predicted'] / scale:>10.2f}{row['measured'] / scale:>10.2f}"
                f"{_error(row['error']):>8}"
            )
        lines.append(f"  {'traffic (GB per step)':<22}{'predicted':>10}{'measured':>10}{'error':>8}")
        for row in result["traffic"]:
            lines.append(
                f"  {row['name']:<22}{row['predicted'] / 1e9:>10.2f}{row['measured'] / 1e9:>10.2f}"
                f"{_error(row['error']):>8}"
            )
        for dim, kinds in m["collectives"].items():
            detail = ", ".join(f"{n} x {kind} ({size / 1e9:.3f} GB)" for kind, (n, size) in kinds.items())
            lines.append(f"    {dim}: {detail}")
        largest = ", ".join(f"{op} {size / GIB:.2f}" for op, size in m["max_other_ops"].items() if size)
        lines.append(f"  activations at their largest, by the op that made them (GiB): {largest}")
        lines.append("")
    return "\n".join(lines).rstrip()


def to_json(results: list[dict]) -> str:
    return json.dumps(results, indent=2)


@dataclass
class MeasuredFit:
    fits: bool
    lines: list[str]  # each measured rank's peak against the usable memory


def measured_fit(cfg, overrides: list[str]) -> MeasuredFit | None:
    """The heaviest ranks' dry run (FakeTensorMode) against the device's memory, 10% kept free as the plan
    keeps it; None where the device's memory is not known (CPU ranks share the host's)."""
    plan = make_plan(cfg, layout_of(cfg))
    if plan.capacity_gb is None:
        return None
    usable = (1 - MEMORY_MARGIN) * plan.capacity_gb * GIB
    lines, fits = [], True
    for result in measure_plan(cfg, overrides, None, "fake"):
        m = result["measurement"]
        fits = fits and m["peak"] <= usable
        kinds = ", ".join(f"{row['name']} {row['measured'] / GIB:.2f}" for row in result["memory"][:-1])
        lines.append(
            f"rank {m['rank']} (stage {m['coords']['pp']}): measured peak {m['peak'] / GIB:.2f} GiB of "
            f"{usable / GIB:.1f} GiB usable (predicted {result['memory'][-1]['predicted'] / GIB:.2f}; {kinds})"
        )
    return MeasuredFit(fits, lines)
