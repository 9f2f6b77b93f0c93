"""Devices the planner knows: memory, power and link bandwidth from the vendors' data sheets, and the compute
efficiency a transformer layer reaches on them.

Peak FLOP/s are those of bigscience_train.metrics.flops (dense tensor cores, SXM parts).

Compute efficiency (the fraction of peak a layer's GEMMs sustain) follows
    efficiency = max_efficiency(device) * g / (g + G_HALF),    g = hidden_size / tp,
because a tensor-parallel rank multiplies (b*s x g)-shaped blocks, and GEMMs narrower than a few hundred
columns cannot fill the device. max_efficiency is calibrated on published Megatron runs of this architecture:
V100 on BigScience tr1-13B (g = 2560), A100 on BLOOM-176B (g = 3584); H100/H200 assume the same fraction as
A100 (unmeasured: a GPU session should replace it with a measured MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

G_HALF = 512.0


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
    # CPU ranks: peak is the matmul rate measured at start-up; links are shared memory.
    "cpu": Device(memory_gb=None, tdp_watts=None, intra_node_gbps=10.0, max_efficiency=0.7),
}


def device_spec(name: str) -> Device:
    if name not in DEVICES:
        raise ValueError(f"cluster.device={name!r} is not a known device ({', '.join(DEVICES)})")
    return DEVICES[name]


def compute_efficiency(device: str, hidden_size: int, tp: int) -> float:
    g = hidden_size / tp
    return device_spec(device).max_efficiency * g / (g + G_HALF)
