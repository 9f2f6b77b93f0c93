"""Devices the planner knows: memory, power and NVLink bandwidth from the vendors' data sheets, and the
throughput model's calibration for each device class.

Peak FLOP/s of GPUs are those of bigscience_train.metrics.flops (dense tensor cores, SXM parts). A CPU has no
such figure, and the planner stays arithmetic (no torch, so no matmul to time, as training does for MFU): it
takes CPU_CORE_TFLOPS per core of a rank, a nominal rate, so CPU plans are rough.

A Calibration holds the constants of plan.throughput's model that no data sheet gives:

- compute efficiency, the fraction of peak a layer's matmuls sustain on one tensor-parallel rank,
      efficiency = max_efficiency * g / (g + width_half) * n / (n + tokens_half),
  g = hidden_size / tp the width of the rank's GEMMs (narrow blocks cannot fill the device) and n = b * s the
  tokens of a micro batch (each micro batch pays kernel launches and the memory-bound work between matmuls
  once, whatever its size);
- latency, the fixed cost of one tensor-parallel all-reduce beyond its bytes: launch, the wait for
  the slowest rank of the group, and the SMs NCCL takes from compute;
- network, the fraction of the cluster's inter-node line rate (cluster.inter_node_gbps) a
  data-parallel all-reduce achieves, as (job nodes, fraction) points interpolated in log(nodes) and held
  constant outside them.

How each was obtained (plan.published has the runs and refits them; docs/planner.md the comparison):

- v100: fitted (least squares in log time) on published BigScience runs on Jean Zay's V100 32 GB nodes: the
  tr3m 1B3 benchmark with activation checkpointing, tr1-13B on 4 and 128 nodes, tr8b-104B at TP2 PP32; the
  other V100 runs are held out. Its network efficiency is not fitted but measured: BigScience's
  all_reduce_bench (experiments/bandwidth) gave 84.7 Gb/s bus bandwidth on 4 nodes and 54.2 Gb/s on 16, of the
  4 x 100 Gb/s Omni-Path links a node has.
- a100: fitted likewise on Jean Zay's A100 80 GB nodes: BLOOM-176B's final layout and its first batch-size
  ramp-up step, and the chronicles-prequel layout trials of 02-20 and 02-25; the rest held out. Its network
  efficiency is fitted: the one published benchmark (5 GB/s per node, January 2022) predates the partition's
  fixes and would make BLOOM's gradient reduction alone take a sixth of its measured iteration.
- h100, h200: assumed, not measured: A100's calibration with their data-sheet peaks and NVLink. A GPU session
  should replace them with a fit on measured steps.
- cpu: nominal (gloo collectives are not modelled beyond bandwidth).

These fractions are Jean Zay's as much as the devices': its Omni-Path network delivered a small part of its
line rate to NCCL (BigScience's experiments/bandwidth notes), so a cluster measured otherwise needs its own
network points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bigscience_train.metrics.flops import datasheet_peak_flops

# One x86 core's fp32 matmul rate, two 256-bit FMA units at about 3 GHz (2 x 8 x 2 x 3e9 FLOP/s); taken for
# every dtype, since half precision on CPUs ranges from emulated (slower) to AMX (faster).
CPU_CORE_TFLOPS = 0.1


@dataclass(frozen=True)
class Calibration:
    max_efficiency: float
    width_half: float  # GEMM columns per rank
    tokens_half: float  # tokens per micro batch
    latency: float  # seconds per tensor-parallel collective
    network: tuple[tuple[int, float], ...]  # (job nodes, fraction of the inter-node line rate)


@dataclass(frozen=True)
class Device:
    memory_gb: float | None  # None: the host's memory, not a device limit
    tdp_watts: float | None
    # Achievable all-reduce bus bandwidth between GPUs of one node (NVLink), GB/s per GPU.
    intra_node_gbps: float
    calibration: Calibration


# BigScience's all_reduce_bench on Jean Zay's V100 nodes: 84.7 Gb/s bus bandwidth over 4 nodes, 54.2 Gb/s
# over 16, of a node's 4 x 100 Gb/s Omni-Path links (experiments/bandwidth/README.md).
V100_NETWORK = ((4, 84.7 / 400), (16, 54.2 / 400))
V100 = Calibration(
    max_efficiency=0.6137, width_half=607.4, tokens_half=120.7, latency=8.555e-4, network=V100_NETWORK
)
A100 = Calibration(
    max_efficiency=0.8134, width_half=339.3, tokens_half=272.0, latency=8.711e-4, network=((1, 0.2171),)
)
CPU = Calibration(max_efficiency=0.7, width_half=0.0, tokens_half=0.0, latency=0.0, network=((1, 1.0),))

DEVICES: dict[str, Device] = {
    # V100 SXM2: BigScience's all_reduce_bench measured 124 GB/s bus bandwidth over a Jean Zay node's 4 GPUs.
    "v100": Device(memory_gb=32.0, tdp_watts=300.0, intra_node_gbps=124.0, calibration=V100),
    "a100": Device(memory_gb=80.0, tdp_watts=400.0, intra_node_gbps=230.0, calibration=A100),
    "h100": Device(memory_gb=80.0, tdp_watts=700.0, intra_node_gbps=370.0, calibration=A100),
    "h200": Device(memory_gb=141.0, tdp_watts=700.0, intra_node_gbps=370.0, calibration=A100),
    # CPU ranks: peak from CPU_CORE_TFLOPS; links are shared memory.
    "cpu": Device(memory_gb=None, tdp_watts=None, intra_node_gbps=10.0, calibration=CPU),
}


def device_spec(name: str) -> Device:
    if name not in DEVICES:
        raise ValueError(f"cluster.device={name!r} is not a known device ({', '.join(DEVICES)})")
    return DEVICES[name]


def peak_flops(cluster, dtype: str) -> float:
    """Peak FLOP/s of one rank of `cluster`: the data sheet's for a GPU; for CPU ranks, the nominal core rate
    times the cores each rank gets (cluster.cpus_per_node shared by the node's ranks, else one)."""
    device_spec(cluster.device)
    if cluster.device == "cpu":
        cores = cluster.cpus_per_node // cluster.procs_per_node if cluster.cpus_per_node else 1
        return max(cores, 1) * CPU_CORE_TFLOPS * 1e12
    try:
        return datasheet_peak_flops(cluster.device, dtype)
    except ValueError as e:
        raise ValueError(f"cluster.device={cluster.device} with precision {dtype}: {e}") from e


def compute_efficiency(calibration: Calibration, hidden_size: int, tp: int, tokens: int) -> float:
    """The fraction of peak a rank's matmuls sustain on (tokens x hidden_size/tp)-shaped blocks."""
    c, g = calibration, hidden_size / tp
    return c.max_efficiency * g / (g + c.width_half) * tokens / (tokens + c.tokens_half)


def network_efficiency(calibration: Calibration, nodes: int) -> float:
    """The fraction of the inter-node line rate an all-reduce over `nodes` achieves."""
    points = calibration.network
    if nodes <= points[0][0]:
        return points[0][1]
    for (n0, e0), (n1, e1) in zip(points, points[1:], strict=False):
        if nodes <= n1:
            return e0 * (e1 / e0) ** (math.log(nodes / n0) / math.log(n1 / n0))
    return points[-1][1]
