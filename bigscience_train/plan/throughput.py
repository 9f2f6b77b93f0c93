"""Time per iteration of a layout: the slowest pipeline rank paced through the schedule, then the gradient
reduction.

    t_iter = (m + (p - 1) / v) * tau + t_dp

Notation: h hidden size, s sequence, b micro batch, a heads, V padded vocabulary, L layers, t tp, p pp, d dp,
v virtual stages (1 unless interleaved), m = B / (b d) micro batches per step, w bytes of the training dtype
(2 in bf16/fp16, 4 in fp32). Constants without a data sheet (efficiency, collective latency, network
efficiency) are plan.hardware's calibration; docs/planner.md compares the result with BigScience's runs.

tau, one micro batch's forward and backward on the slowest pipeline rank, nothing overlapped (Megatron-style
tensor parallelism blocks on its all-reduces; the pipeline schedule waits on its sends):
- each of the rank's layers (plan.memory.stage_layers: with pp_count_embeddings the embedding and the output
  layer take a layer's slot on the first and last stages) costs
    matmuls    q 24 b s h^2 / t FLOPs at peak x efficiency (plan.hardware.compute_efficiency),
    attention  q 4 b s^2 h / t FLOPs at the same efficiency, of the tensor-core peak when the head width
               h / a is a multiple of 8 (16 bytes in half precision), else of the fp32 CUDA-core peak, since
               cuBLAS runs misaligned half-precision operands off the tensor cores,
  with q = 3 passes (a forward, two for backward), 4 under full recompute (the forward again); selective
  recompute adds SELECTIVE_OVERHEAD to the compute;
- the output layer, on the last rank, 3 x 2 b s h V / t FLOPs (never recomputed); the embedding lookup is free;
- tensor parallelism, per layer 2 all-reduces of b s h w bytes forward, 2 backward and 2 more under full
  recompute, each latency + 2 (t-1)/t of its bytes over NVLink (the network's share beyond a node);
  sequence parallelism moves the same bytes as a reduce-scatter and an all-gather;
- the pipeline, per micro batch the activations forward and their gradient back, b s h w bytes each way from
  every tensor-parallel rank (each sends its own copy), v times with interleaving; once the job spans nodes
  at the line rate of a GPU's share of its node's links (cluster.inter_node_gbps / procs_per_node): a send is
  point to point, without a ring's losses.

The schedule: 1F1B, GPipe and interleaved 1F1B all run the m micro batches through the slowest rank after a
fill of (p - 1) / v micro batches (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
GPU Clusters"); the bubble is that fill's share of the pipelined time.

t_dp, the data-parallel traffic of a step with P_r the heaviest rank's parameters and r the bytes of
parallel.reduce_dtype, after the last micro batch (through a pipeline the trainer reduces once per step, and
nothing is left to overlap it with):
- replicas all-reduce the gradients: 2 (d-1)/d r P_r bytes;
- zero1 and zero2 reduce-scatter them and all-gather the updated parameters in the training dtype:
  (d-1)/d (r + w) P_r (zero2's per-micro-batch reductions, without a pipeline, hide under the next backward);
- zero3 gathers the parameters once more for backward: (d-1)/d (r + 2 w) P_r;
over NVLink when the group fits in a node, else at the node's line rate x the calibration's network efficiency
for the group's span of nodes, shared by the min(t, procs_per_node) groups with ranks on each node (ranks are
laid out tp fastest, then dp, then pp, as parallel.dims's mesh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bigscience_train.metrics.flops import datasheet_peak_flops, flops_per_iteration
from bigscience_train.plan.hardware import (
    Calibration,
    compute_efficiency,
    device_spec,
    network_efficiency,
    peak_flops,
)
from bigscience_train.plan.memory import Layout, stage_layers

# Selective recompute re-runs the elementwise work between matmuls: memory-bound, a few percent of a step
# (2-4% measured by Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models").
SELECTIVE_OVERHEAD = 0.03
# Tensor cores take half-precision operands whose leading dimensions are multiples of 8 elements.
TENSOR_CORE_ALIGNMENT = 8


@dataclass
class TimeEstimate:
    """A step's time split as plan.report prints it: the slowest rank's work over m micro batches (compute),
    the fill and drain (bubble_fraction of the pipelined time), and the communication through both."""

    compute: float
    bubble_fraction: float
    tensor_parallel: float
    pipeline_parallel: float
    data_parallel: float
    model_flops: float
    hardware_flops: float
    efficiency: float

    @property
    def iteration(self) -> float:
        return self.compute / (1 - self.bubble_fraction) + (
            self.tensor_parallel + self.pipeline_parallel + self.data_parallel
        )


@dataclass(frozen=True)
class _MicroBatch:
    """One micro batch's forward and backward on one pipeline rank, seconds."""

    compute: float
    tensor_parallel: float
    pipeline_parallel: float

    @property
    def total(self) -> float:
        return self.compute + self.tensor_parallel + self.pipeline_parallel


def _ring(bytes_: float, ranks: int, bytes_per_s: float, passes: float = 2.0) -> float:
    return 0.0 if ranks == 1 else passes * (ranks - 1) / ranks * bytes_ / bytes_per_s


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def attention_peak(cluster, dtype: str, head_dim: int) -> float:
    """The peak the attention's batched matmuls run at: the tensor cores' unless half-precision operands are
    misaligned, then the fp32 CUDA cores'."""
    peak = peak_flops(cluster, dtype)
    if cluster.device == "cpu" or dtype == "fp32" or head_dim % TENSOR_CORE_ALIGNMENT == 0:
        return peak
    return datasheet_peak_flops(cluster.device, "fp32")


def rank_layers(num_layers: int, pp: int, virtual: int, count_embeddings: bool) -> tuple[int, int, int]:
    """Transformer layers on the first, a middle and the last pipeline rank, each holding `virtual` stages."""
    if pp == 1:
        return num_layers, num_layers, num_layers
    first, middle, last = stage_layers(num_layers, pp * virtual, count_embeddings)
    return first + (virtual - 1) * middle, virtual * middle, last + (virtual - 1) * middle


def data_parallel_seconds(cfg, dims, params_per_rank: int, calibration: Calibration) -> float:
    c, t, d = cfg.cluster, dims.tp, dims.dp
    if d == 1:
        return 0.0
    reduce, gather = _dtype_bytes(dims.reduce_dtype), _dtype_bytes(cfg.precision.dtype.value)
    if dims.dp_shard == "none":
        volume = 2 * reduce
    else:
        volume = reduce + (2 if dims.dp_shard == "zero3" else 1) * gather
    per_node = c.procs_per_node
    if t * d <= per_node:
        bandwidth = device_spec(c.device).intra_node_gbps * 1e9
    else:
        span = math.ceil(t * d / per_node)
        node = c.inter_node_gbps * 1e9 * network_efficiency(calibration, span)
        bandwidth = node / min(t, per_node)
    return _ring(volume * params_per_rank, d, bandwidth, passes=1.0)


def estimate_time(
    cfg, layout: Layout, global_batch: int, params_per_rank: int, calibration: Calibration | None = None
) -> TimeEstimate:
    """`calibration` replaces the device's (plan.published refits it)."""
    c, dims = cfg.cluster, layout.dims
    device = device_spec(c.device)
    cal = calibration or device.calibration
    dtype = cfg.precision.dtype.value
    w = _dtype_bytes(dtype)
    t, p, b = dims.tp, dims.pp, layout.micro_batch
    shape = dims.model_shape(cfg.model)
    h, s, L, V = shape.hidden_size, shape.seq_length, shape.num_layers, shape.vocab_size
    full = dims.recompute == "full"
    virtual = dims.virtual_stages if dims.pp_schedule == "interleaved_1f1b" else 1
    m = layout.micro_batches(global_batch)

    passes = 4 if full else 3
    efficiency = compute_efficiency(cal, h, t, b * s)
    peak = peak_flops(c, dtype) * efficiency
    layer = passes * 24 * b * s * h * h / t / peak
    layer += passes * 4 * b * s * s * h / t / (attention_peak(c, dtype, shape.head_dim) * efficiency)
    if dims.recompute == "selective":
        layer *= 1 + SELECTIVE_OVERHEAD
    output = 3 * 2 * b * s * h * V / t / peak

    per_node = c.procs_per_node
    network = c.inter_node_gbps * 1e9 / per_node  # a GPU's share of its node's links
    activation = b * s * h * w
    tp_bandwidth = device.intra_node_gbps * 1e9 if t <= per_node else network
    all_reduce = cal.latency + _ring(activation, t, tp_bandwidth) if t > 1 else 0.0
    layer_tp = (6 if full else 4) * all_reduce
    pp_bandwidth = device.intra_node_gbps * 1e9 if dims.world_size <= per_node else network
    p2p = 0.0 if p == 1 else 2 * virtual * activation / pp_bandwidth

    first, middle, last = rank_layers(L, p, virtual, dims.pp_count_embeddings)
    ranks = [
        _MicroBatch(n * layer + (output if i == 2 or p == 1 else 0.0), n * layer_tp, p2p)
        for i, n in enumerate((first, middle, last))
    ]
    slowest = max(ranks, key=lambda r: r.total)
    fill = (p - 1) / virtual
    return TimeEstimate(
        compute=m * slowest.compute,
        bubble_fraction=fill / (m + fill),
        tensor_parallel=(m + fill) * slowest.tensor_parallel,
        pipeline_parallel=(m + fill) * slowest.pipeline_parallel,
        data_parallel=data_parallel_seconds(cfg, dims, params_per_rank, cal),
        model_flops=flops_per_iteration(global_batch, s, L, h, V),
        hardware_flops=flops_per_iteration(global_batch, s, L, h, V, recompute=full),
        efficiency=efficiency,
    )
