"""The planner's text: one plan in full, or a ranked table of layouts."""

from __future__ import annotations

from bigscience_train.plan.estimate import MEMORY_MARGIN, Plan
from bigscience_train.plan.memory import GIB


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def fit_verdict(plan: Plan) -> str:
    if plan.fits is None:
        return "no device memory limit known (CPU ranks share the host's memory)"
    usable = (1 - MEMORY_MARGIN) * plan.capacity_gb
    verb = "fits" if plan.fits else "does NOT fit"
    return (
        f"{verb} a {plan.capacity_gb:g} GB device: peak {plan.memory.peak / GIB:.1f} GiB of "
        f"{usable:.1f} GiB usable ({MEMORY_MARGIN:.0%} kept free)"
    )


def memory_breakdown(plan: Plan) -> list[str]:
    lines = [f"  {name:<24}{_gib(value)}" for name, value in plan.memory.terms.items()]
    lines.append(f"  {'forward/backward peak':<24}{_gib(plan.memory.forward_backward_peak)}")
    lines.append(f"  {'optimizer step peak':<24}{_gib(plan.memory.optimizer_peak)}")
    return lines


def format_plan(cfg, plan: Plan) -> str:
    c, t = cfg.cluster, plan.time
    m = plan.layout.micro_batches(cfg.train.global_batch_size)
    lines = [
        f"model {cfg.model.name}: {plan.parameters:,} parameters; {plan.memory.parameters_per_rank:,} on the "
        "heaviest rank",
        f"cluster {c.name}: {c.nodes} node(s) x {c.procs_per_node} {c.device}, {plan.world} ranks; "
        f"{cfg.precision.dtype.value}",
        f"layout {plan.layout}; {m} micro batches per step",
        "memory per device (heaviest pipeline stage):",
        *memory_breakdown(plan),
        f"  => {fit_verdict(plan)}",
        "time per iteration:",
        f"  compute               {t.compute:10.3f} s  (efficiency {t.efficiency:.0%} of peak)",
        f"  pipeline bubble       {t.compute * t.bubble_fraction / (1 - t.bubble_fraction):10.3f} s  "
        f"({t.bubble_fraction:.1%} of the pipelined time)",
        f"  tensor parallel comm  {t.tensor_parallel:10.3f} s",
        f"  pipeline p2p          {t.pipeline_parallel:10.3f} s",
        f"  data parallel comm    {t.data_parallel:10.3f} s",
        f"  => {t.iteration:.3f} s per iteration; {t.model_flops:.3e} model FLOPs "
        f"({t.hardware_flops:.3e} with recompute)",
        f"  => {plan.tflops_per_device():.4g} TFLOP/s per device "
        f"({plan.tflops_per_device(hardware=True):.4g} counting recompute)",
        f"throughput: {plan.tokens_per_day / 1e9:.3f} B tokens/day",
    ]
    if plan.days is not None:
        lines.append(
            f"run: {plan.token_budget:,} tokens in {plan.days:.2f} days, {plan.device_hours:,.0f} device-hours"
        )
    if plan.energy_kwh is not None:
        co2 = (
            f", {plan.emissions_kg:,.0f} kg CO2eq at {plan.carbon_intensity:g} g/kWh"
            if plan.emissions_kg is not None
            else " (set cluster.carbon_intensity for emissions)"
        )
        lines.append(f"energy: {plan.energy_kwh:,.0f} kWh ({plan.tdp_watts:g} W TDP x PUE {plan.pue:g}){co2}")
    return "\n".join(lines)


def format_search(cfg, plans: list[Plan]) -> str:
    if not plans:
        return "no valid layout fits the device"
    header = f"{'rank':>4}  {'layout':<48} {'s/iter':>9} {'TFLOP/s':>8} {'peak GiB':>9}"
    rows = [
        f"{i:>4}  {str(p.layout):<48} {p.time.iteration:9.3f} {p.tflops_per_device():8.1f} "
        f"{p.memory.peak / GIB:9.1f}"
        for i, p in enumerate(plans, 1)
    ]
    c = cfg.cluster
    return "\n".join(
        [
            f"fastest layouts that fit, {cfg.model.name} on {c.nodes} x {c.procs_per_node} {c.device}:",
            header,
            *rows,
        ]
    )
