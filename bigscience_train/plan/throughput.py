"""Time per iteration of a layout, from compute, pipeline bubble and communication.

    t_iter = t_compute * bubble + t_tp + t_pp + t_dp

- t_compute = F_hw / (N * peak * efficiency): F_hw the hardware FLOPs of one iteration (Narayanan et al. 2021,
  eq. 3, with a fourth forward under full recompute), N devices, peak and efficiency from plan.hardware;
  selective recompute adds SELECTIVE_OVERHEAD.
- bubble = (m + p - 1) / m for GPipe and 1F1B, (m + (p - 1)/v) / m interleaved; m = B / (b d) micro batches.
- t_tp: per layer and micro batch, 2 all-reduces of b s h activations forward, 2 backward, 2 more for a full
  recompute; a ring all-reduce moves 2 (t-1)/t of the bytes over NVLink (over the network if t exceeds a node).
- t_pp: each micro batch sends b s h activations forward and their gradient back across each stage boundary.
- t_dp: gradients (fp32: the trainer keeps fp32 gradients) all-reduced over d ranks, 2 (d-1)/d of 4 P_r bytes
  (FSDP zero2: reduce-scatter + all-gather, the same volume; zero3 one all-gather more, 3 (d-1)/d), over each
  GPU's share of its node's network link once the group spans nodes.
No overlap of communication with compute is assumed: the estimate errs towards slower.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigscience_train.metrics.flops import flops_per_iteration
from bigscience_train.plan.hardware import compute_efficiency, device_spec, peak_flops
from bigscience_train.plan.memory import Layout, stage_layers

# Selective recompute re-runs the elementwise work between matmuls: memory-bound, a few percent of a step
# (2-4% measured by Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models").
SELECTIVE_OVERHEAD = 0.03


@dataclass
class TimeEstimate:
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


def _ring(bytes_: float, ranks: int, gbps: float, passes: float = 2.0) -> float:
    return 0.0 if ranks == 1 else passes * (ranks - 1) / ranks * bytes_ / (gbps * 1e9)


def estimate_time(cfg, layout: Layout, global_batch: int, params_per_rank: int) -> TimeEstimate:
    c, dims = cfg.cluster, layout.dims
    dtype = cfg.precision.dtype.value
    t, p, d, b = dims.tp, dims.pp, dims.dp, layout.micro_batch
    shape = dims.model_shape(cfg.model)
    h, s, L, v = shape.hidden_size, shape.seq_length, shape.num_layers, shape.vocab_size
    full = dims.recompute == "full"
    model_flops = flops_per_iteration(global_batch, s, L, h, v)
    hw_flops = flops_per_iteration(global_batch, s, L, h, v, recompute=full)
    efficiency = compute_efficiency(c.device, h, t)
    compute = hw_flops / (dims.world_size * peak_flops(c, dtype) * efficiency)
    if dims.recompute == "selective":
        compute *= 1 + SELECTIVE_OVERHEAD

    m = layout.micro_batches(global_batch)
    extra = (p - 1) / (dims.virtual_stages if dims.pp_schedule == "interleaved_1f1b" else 1)
    bubble = extra / (m + extra)

    per_node = c.procs_per_node
    intra = device_spec(c.device).intra_node_gbps
    network = c.inter_node_gbps / per_node  # each GPU's share of its node's link
    act_bytes = s * b * h * (2 if dtype != "fp32" else 4)
    _, middle, _ = stage_layers(L, p, dims.pp_count_embeddings)
    all_reduces = middle * m * (6 if full else 4)
    tp_time = all_reduces * _ring(act_bytes, t, intra if t <= per_node else network)
    pp_time = 0.0 if p == 1 else 2 * m * act_bytes / ((intra if t * p <= per_node else network) * 1e9)
    passes = 3.0 if dims.fsdp and dims.dp_shard == "zero3" else 2.0
    dp_time = _ring(4 * params_per_rank, d, intra if dims.world_size <= per_node else network, passes)
    return TimeEstimate(compute, bubble, tp_time, pp_time, dp_time, model_flops, hw_flops, efficiency)
