"""Devices the planner knows: memory, power and link bandwidth from the vendors' data sheets, and the compute
efficiency a transformer layer reaches on them.

Peak FLOP/s of GPUs are those of bigscience_train.metrics.flops (dense tensor cores, SXM parts). A CPU has no
such figure, and the planner stays arithmetic (no torch, so no matmul to time, as training does for MFU): it
takes CPU_CORE_TFLOPS per core of a rank, a nominal rate, so CPU plans are rough.

Compute efficiency (the fraction of peak a layer's GEMMs sustain) follows
    efficiency = max_efficiency(device) * g / (g + G_HALF),    g = hidden_size / tp,
because a tensor-parallel rank multiplies (b*s x g)-shaped blocks, and GEMMs narrower than a few hundred
columns cannot fill the device. max_efficiency is calibrated on published Megatron runs of this architecture:
V100 on BigScience tr1-13B (g = 2560), A100 on BLOOM-176B (g = 3584); H100/H200 assume the same fraction as
A100 (unmeasured: a GPU session should replace it with a measured MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

from bigscience_train.metrics.flops import datasheet_peak_flops

G_HALF = 512.0
# One x86 core's fp32 matmul rate, two 256-bit FMA units at about 3 GHz (2 x 8 x 2 x 3e9 FLOP/s); taken for
# every dtype, since half precision on CPUs ranges from emulated (slower) to AMX (faster).
CPU_CORE_TFLOPS = 0.1


@dataclass(frozen=True)
class Device:
    memory_gb: float | None  # None: the host's memory, not a device limit
    tdp_watts: float | None
    # Achievable all-reduce bus bandwidth between GPUs of one node (NVLink), GB/s per GPU.
    intra_node_gbps: float
    max_efficiency: float


DEVICES: dict[str, Device] = {
    "v100": Device(memory_gb=32.0, tdp_watts=300.0, intra_node_gbps=130.0, max_efficiency=0.45),
    "a100": Device(memory_gb=80.0, tdp_watts=400.0, intra_node_gbps=230.0, max_efficiency=0.62),
    "h100": Device(memory_gb=80.0, tdp_watts=700.0, intra_node_gbps=370.0, max_efficiency=0.62),
    "h200": Device(memory_gb=141.0, tdp_watts=700.0, intra_node_gbps=370.0, max_efficiency=0.62),
    # CPU ranks: peak from CPU_CORE_TFLOPS; links are shared memory.
    "cpu": Device(memory_gb=None, tdp_watts=None, intra_node_gbps=10.0, max_efficiency=0.7),
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


def compute_efficiency(device: str, hidden_size: int, tp: int) -> float:
    g = hidden_size / tp
    return device_spec(device).max_efficiency * g / (g + G_HALF)
