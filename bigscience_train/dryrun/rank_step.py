"""One rank of the configured job, built and trained for a step in this process, measured.

The process joins a fake process group as rank R of the job's world (fake_rank.py), builds exactly what rank
R builds (its pipeline stages, tensor-parallel shards, FSDP/ZeRO sharding, AdamW and its states), then runs
one step of the job's schedule (every micro-batch of its global batch) under a storage tracker and a
collective recorder. Collectives return at once and move nothing: values are
meaningless, shapes, memory and traffic are rank R's.

A 1F1B step of many micro-batches is measured on fewer (`equivalent_micro_batches`): its memory is the same,
and its traffic, affine in the micro-batch count, is that of two short steps extrapolated to the job's count.

Where the rank's step is too big for this machine it runs under FakeTensorMode: tensors have shapes and
storages but no data, and nothing is computed. The scalar decisions of a real step that need values (skip on
overflow, clip or not) are left out; their collectives are issued all the same.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.pipelining import PipelineStage
from torch.utils._pytree import tree_leaves

from bigscience_train.config.validate import cluster_world_size
from bigscience_train.dryrun.collectives import CollectiveRecorder, mesh_group_dims
from bigscience_train.dryrun.fake_rank import init_fake_rank
from bigscience_train.dryrun.storages import StorageTracker, leaf_tensors
from bigscience_train.metrics.flops import flops_per_iteration
from bigscience_train.parallel.build import ParallelModel
from bigscience_train.parallel.dims import MESH_DIMS, ParallelDims
from bigscience_train.parallel.pipeline import local_stage_ids
from bigscience_train.train.loop import build_optimizer

# A rank's step is computed for real when its FLOPs take seconds on this machine, not hours.
REAL_STEP_FLOPS = 2e11
# ... and when its predicted memory is under this share of the machine's.
REAL_MEMORY_SHARE = 0.5


@dataclass
class RankMeasurement:
    rank: int
    coords: dict[str, int]  # the rank's place on each mesh dimension
    stages: list[int]  # its pipeline stages
    mode: str  # "real": computed on this CPU; "fake": shapes and storages only
    build_seconds: float
    step_seconds: float
    micro_batches: int  # the job's micro-batches per step, which the traffic is reported for
    micro_batches_run: list[int]  # those of the measured step, and of the traffic's second step if any
    build_peak: int  # bytes alive at the build's peak
    memory: dict[str, int]  # each kind of memory at its largest during the step, bytes
    peak: int  # the step's peak, every kind together
    peak_kinds: dict[str, int]  # the kinds at that peak
    # The largest unnamed storages (activations) at that peak, by the op that made them, and the same when
    # the activations are at their largest.
    peak_other_ops: dict[str, int]
    max_other_ops: dict[str, int]
    # mesh dimension -> "kind dtype" -> [count, bytes]
    collectives: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def rank_coords(dims: ParallelDims, rank: int) -> dict[str, int]:
    """The rank's index on each mesh dimension: the mesh is (pp, dp, tp), row-major."""
    sizes = {"pp": dims.pp, "dp": dims.dp, "tp": dims.tp}
    coords, rest = {}, rank
    for dim in reversed(MESH_DIMS):
        coords[dim] = rest % sizes[dim]
        rest //= sizes[dim]
    return {dim: coords[dim] for dim in MESH_DIMS}


def heaviest_ranks(dims: ParallelDims) -> list[int]:
    """The first and the last pipeline stage's first rank: the embedding and the micro-batches in flight on
    one, the output layer and its logits on the other."""
    last = (dims.pp - 1) * dims.dp * dims.tp
    return [0] if last == 0 else [0, last]


def fits_for_real(cfg, dims: ParallelDims, predicted_peak: float) -> bool:
    """Whether one rank's step can be computed here: its share of the job's FLOPs and its predicted memory."""
    m, tr = cfg.model, cfg.train
    flops = flops_per_iteration(tr.global_batch_size, m.seq_length, m.num_layers, m.hidden_size, m.vocab_size)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return flops / dims.world_size < REAL_STEP_FLOPS and predicted_peak < REAL_MEMORY_SHARE * memory


@contextlib.contextmanager
def static_pipeline_vote():
    """Pipeline stages vote over the group whether their shapes are static; a fake group delivers no vote.
    Ours are always static (parallel/pipeline.py gives every shape), so the outcome is known: the vote's
    messages are still sent, their answer replaced."""
    original = PipelineStage._warmup_backward_result

    def static(stage, received_result=None):
        original(stage, received_result)
        # A literal: under FakeTensorMode a constant, whose value the schedule can read.
        return torch.tensor([1], dtype=torch.int32)

    PipelineStage._warmup_backward_result = static
    try:
        yield
    finally:
        PipelineStage._warmup_backward_result = original


def synthetic_batches(cfg, micro_batches: int, device: torch.device) -> list[dict]:
    mbs, seq = cfg.train.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (mbs, seq), device=device)
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(mbs, seq, device=device)}
    return [batch] * micro_batches


def train_step(parallel: ParallelModel, optimizer, penv, batches: list[dict], loss_scale: float) -> None:
    """Trainer.train_step's collectives and allocations on given batches, without its decisions on values."""
    optimizer.zero_grad(set_to_none=True)
    total = parallel.forward_backward(batches, loss_scale, train=True)
    penv.all_reduce_sum(total)
    params = parallel.reduce_gradients(loss_scale)
    parallel.grad_norm(params)
    # The step's skip and stop decision, taken over every rank.
    dist.all_reduce(torch.zeros(2, dtype=torch.float64, device=penv.device), op=dist.ReduceOp.MAX)
    optimizer.step()


def fsdp_params(parts) -> list:
    """FSDP's record of each parameter it manages: where it keeps the gathered copy and the whole gradients
    it accumulates between reductions (private to torch, read only here)."""
    found = []
    for part in parts:
        for module in part.modules():
            state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
            group = state._fsdp_param_group if state is not None else None
            found += group.fsdp_params if group is not None else []
    return found


def memory_kinds(
    parallel: ParallelModel, optimizer, named_gradients: weakref.WeakValueDictionary
) -> dict[str, list[torch.Tensor]]:
    """The rank's tensors by what they are, as they stand when called: FSDP swaps gathered parameters in and
    out of the modules during a step. A gradient stays one until it is freed: FSDP takes a unit's whole
    gradients off its parameters to reduce them, and `named_gradients` (weak, filled here) keeps naming them
    until then; the reduce-scatter's input buffer, a copy of them, is a buffer (activations)."""
    parts = parallel.pipeline.parts if parallel.pipeline is not None else [parallel.model]
    sharded = parallel.params
    held = {id(p) for p in sharded}
    current = [p for part in parts for p in part.parameters()]
    managed = fsdp_params(parts)
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    buffers = [b for part in parts for b in part.buffers()]
    buffers += [t for part in parts for t in tree_leaves(part.mask_cache) if isinstance(t, torch.Tensor)]
    gradients = [p.grad for p in (*sharded, *current) if p.grad is not None]
    gradients += [f.unsharded_accumulated_grad for f in managed if f.unsharded_accumulated_grad is not None]
    # Their plain tensors: FSDP hands a DTensor gradient's local tensor to the reduction and drops the DTensor.
    named_gradients.update((id(g), g) for grad in gradients for g in leaf_tensors(grad))
    gradients = list(named_gradients.values())
    gathered = [p for p in current if id(p) not in held]
    gathered += [f._unsharded_param for f in managed if hasattr(f, "_unsharded_param")]
    # Their storage, which the first gather fills before the parameter that views it exists.
    gathered += [t for f in managed for t in getattr(f, "all_gather_outputs", ())]
    return {
        "weights": list(sharded),
        "optimizer states": states,
        "gradients": gradients,
        "gathered parameters": gathered,
        "buffers": buffers,
    }


def create_optimizer_states(parallel: ParallelModel, optimizer) -> None:
    """AdamW's states as the first step leaves them, from zero gradients: no forward pass needed."""
    for p in parallel.params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def equivalent_micro_batches(dims: ParallelDims, micro_batches: int) -> int:
    """The fewest micro-batches whose 1F1B step has the memory of `micro_batches`' step: stage k holds at most
    min(pp - k, m) micro-batches in flight, reached within the warm-up, and every steady-state micro-batch
    after the first repeats the same allocations; the whole gradients are accumulated from the first
    backward, reduced in the last. pp + 1 keeps a steady-state micro-batch in. GPipe (every micro-batch in
    flight), interleaved schedules and the loop without a pipeline run every micro-batch."""
    if dims.pp == 1 or dims.pp_schedule != "1f1b":
        return micro_batches
    return min(micro_batches, dims.pp + 1)


def extrapolated(
    first: dict[tuple, tuple[int, int]], second: dict[tuple, tuple[int, int]], steps: int
) -> dict[tuple, tuple[int, int]]:
    """Each collective's (count, bytes) `steps` micro-batches past the first summary, the second being one
    micro-batch past it: a 1F1B step's traffic is affine in its micro-batch count (the same messages each
    micro-batch, the data-parallel gather and reduction once a step)."""
    return {
        key: tuple(
            a + steps * (b - a) for a, b in zip(first.get(key, (0, 0)), second.get(key, (0, 0)), strict=True)
        )
        for key in first.keys() | second.keys()
    }


def measure_rank(cfg, rank: int, fake: bool, shorten: bool = True) -> RankMeasurement:
    """Builds rank `rank` of the configured job here and measures one training step of it; `shorten`: on
    equivalent_micro_batches, its traffic extrapolated from a second step one micro-batch longer."""
    dims = ParallelDims.from_config(cfg, cluster_world_size(cfg.cluster))
    shape, tr = dims.model_shape(cfg.model), cfg.train
    dtype = cfg.precision.dtype.value
    loss_scale = float(2**cfg.precision.initial_scale_power) if dtype == "fp16" else 1.0
    micro_batches = dims.micro_batches(tr.global_batch_size, tr.micro_batch_size)
    run = equivalent_micro_batches(dims, micro_batches) if shorten else micro_batches
    penv = init_fake_rank(dims, rank, "cpu")
    # The mesh and the plans are built on real (meta) tensors: DeviceMesh computes with its rank tensors.
    storage = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    group_dims = mesh_group_dims(penv.mesh)
    try:
        with StorageTracker(dict, fake) as build:
            start = time.perf_counter()
            parallel = ParallelModel(shape, penv, tr.seed, dtype, False, tr.fused_output_loss, storage)
            build_seconds = time.perf_counter() - start
        with storage, static_pipeline_vote():
            optimizer = build_optimizer(parallel.model, cfg.optim, penv.device)
            create_optimizer_states(parallel, optimizer)
            named_gradients = weakref.WeakValueDictionary()
            tracker = StorageTracker(lambda: memory_kinds(parallel, optimizer, named_gradients), fake)
            with tracker, CollectiveRecorder(group_dims) as recorder:
                start = time.perf_counter()
                train_step(parallel, optimizer, penv, synthetic_batches(cfg, run, penv.device), loss_scale)
                step_seconds = time.perf_counter() - start
            traffic = recorder.summary()
            runs = [run]
            if run < micro_batches:
                with CollectiveRecorder(group_dims) as longer:
                    train_step(
                        parallel, optimizer, penv, synthetic_batches(cfg, run + 1, penv.device), loss_scale
                    )
                traffic = extrapolated(traffic, longer.summary(), micro_batches - run)
                runs.append(run + 1)
    finally:
        dist.destroy_process_group()
    collectives: dict[str, dict[str, list[int]]] = {}
    for (dim, kind, dt), (count, size) in sorted(traffic.items()):
        collectives.setdefault(dim, {})[f"{kind} {dt}"] = [count, size]
    return RankMeasurement(
        rank=rank,
        coords=rank_coords(dims, rank),
        stages=local_stage_ids(rank_coords(dims, rank)["pp"], dims.pp, dims.virtual_stages),
        mode="fake" if fake else "real",
        build_seconds=build_seconds,
        step_seconds=step_seconds,
        micro_batches=micro_batches,
        micro_batches_run=runs,
        build_peak=build.peak,
        memory=dict(tracker.max_kinds),
        peak=tracker.peak,
        peak_kinds=tracker.peak_kinds,
        peak_other_ops=tracker.peak_other_ops,
        max_other_ops=tracker.max_other_ops,
        collectives=collectives,
    )
