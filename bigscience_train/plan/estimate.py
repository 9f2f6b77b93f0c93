"""A plan: one layout's memory, speed, duration and energy; and the search over layouts for a node count.

Duration and cost: tokens per day = B s / t_iter x 86400; days to the run's token budget (train.tokens, or
train.iters x B x s); device-hours = N x days x 24; energy = device-hours x TDP x PUE (the estimate of the BLOOM
carbon paper, Luccioni et al. 2022); emissions = energy x grid intensity.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from bigscience_train.config.validate import batch_sizes, cluster_world_size, pipeline_problems
from bigscience_train.parallel.dims import ParallelDims
from bigscience_train.plan.hardware import device_spec
from bigscience_train.plan.memory import GIB, Layout, MemoryEstimate, estimate_memory, parameter_counts
from bigscience_train.plan.throughput import TimeEstimate, estimate_time

# Kept free on the device: allocator fragmentation, the CUDA context and communication buffers.
MEMORY_MARGIN = 0.10
MICRO_BATCHES = (1, 2, 4, 8, 16)
RECOMPUTE = ("none", "selective", "full")


@dataclass
class Plan:
    layout: Layout
    world: int
    parameters: int
    memory: MemoryEstimate
    time: TimeEstimate
    capacity_gb: float | None
    tokens_per_iteration: int
    token_budget: int | None
    tdp_watts: float | None
    pue: float
    carbon_intensity: float | None

    @property
    def fits(self) -> bool | None:
        """None when the device has no known memory (CPU ranks share the host's)."""
        if self.capacity_gb is None:
            return None
        return self.memory.peak <= (1 - MEMORY_MARGIN) * self.capacity_gb * GIB

    def tflops_per_device(self, hardware: bool = False) -> float:
        flops = self.time.hardware_flops if hardware else self.time.model_flops
        return flops / self.time.iteration / self.world / 1e12

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_iteration / self.time.iteration * 86400

    @property
    def days(self) -> float | None:
        return None if self.token_budget is None else self.token_budget / self.tokens_per_day

    @property
    def device_hours(self) -> float | None:
        return None if self.days is None else self.world * self.days * 24

    @property
    def energy_kwh(self) -> float | None:
        if self.device_hours is None or self.tdp_watts is None:
            return None
        return self.device_hours * self.tdp_watts * self.pue / 1000

    @property
    def emissions_kg(self) -> float | None:
        if self.energy_kwh is None or self.carbon_intensity is None:
            return None
        return self.energy_kwh * self.carbon_intensity / 1000


def layout_of(cfg) -> Layout:
    """The layout a config asks for, on its cluster's nodes x ranks per node."""
    return Layout(ParallelDims.from_config(cfg, cluster_world_size(cfg.cluster)), cfg.train.micro_batch_size)


def token_budget(cfg) -> int | None:
    tr = cfg.train
    if tr.tokens is not None:
        return int(tr.tokens)
    if tr.iters is not None:
        return int(tr.iters) * tr.global_batch_size * cfg.model.seq_length
    return None


def make_plan(cfg, layout: Layout) -> Plan:
    c, tr = cfg.cluster, cfg.train
    device = device_spec(c.device)
    dims = layout.dims
    memory = estimate_memory(cfg, layout, tr.global_batch_size)
    time = estimate_time(cfg, layout, tr.global_batch_size, memory.parameters_per_rank)
    return Plan(
        layout=layout,
        world=dims.world_size,
        parameters=parameter_counts(dims.model_shape(cfg.model), dims.tp).total,
        memory=memory,
        time=time,
        capacity_gb=c.device_memory_gb if c.device_memory_gb is not None else device.memory_gb,
        tokens_per_iteration=tr.global_batch_size * cfg.model.seq_length,
        token_budget=token_budget(cfg),
        tdp_watts=c.tdp_watts if c.tdp_watts is not None else device.tdp_watts,
        pue=c.pue,
        carbon_intensity=c.carbon_intensity,
    )


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _trainable(layout: Layout, batches: list[int]) -> bool:
    """Whether the trainer takes every global batch of the run (ramp-up included) on this layout."""
    try:
        for batch in batches:
            layout.micro_batches(batch)
    except ValueError:
        return False
    step = layout.micro_batch * layout.dims.dp
    return layout.dims.pp == 1 or not pipeline_problems(layout.dims, batches, step)


def candidate_layouts(cfg) -> list[Layout]:
    """Valid layouts on the cluster's nodes: TP within a node and dividing the heads, PP (x virtual stages)
    dividing the layers (with the embedding slots when pp_count_embeddings), and every batch of the run in
    micro batches the pipeline schedule takes."""
    m, c, par = cfg.model, cfg.cluster, cfg.parallel
    world = cluster_world_size(c)
    batches = batch_sizes(cfg.train.global_batch_size, list(cfg.train.rampup_batch_size))
    base = ParallelDims.from_config(cfg, world)
    units = m.num_layers + (2 if par.pp_count_embeddings else 0)
    layouts = []
    for tp, pp in itertools.product(_divisors(c.procs_per_node), _divisors(world)):
        schedule = base.pp_schedule if pp > 1 else "1f1b"
        virtual = base.virtual_stages if schedule == "interleaved_1f1b" else 1
        if m.num_heads % tp or units % (pp * virtual) or world % (tp * pp):
            continue
        if pp > 1 and (units // pp) < (2 if par.pp_count_embeddings else 1):
            continue
        for mbs, recompute in itertools.product(MICRO_BATCHES, RECOMPUTE):
            dims = dataclasses.replace(
                base,
                tp=tp,
                pp=pp,
                dp=world // (tp * pp),
                sequence_parallel=base.sequence_parallel and tp > 1,
                pp_schedule=schedule,
                virtual_stages=virtual,
                recompute=recompute,
            )
            layout = Layout(dims, mbs)
            if _trainable(layout, batches):
                layouts.append(layout)
    return layouts


def search(cfg, top: int = 10) -> list[Plan]:
    """The fitting layouts, fastest first (ties: less memory)."""
    plans = [make_plan(cfg, layout) for layout in candidate_layouts(cfg)]
    fitting = [p for p in plans if p.fits is not False]
    fitting.sort(key=lambda p: (p.time.iteration, p.memory.peak))
    return fitting[:top]
