"""Model FLOPs and the devices' data-sheet peaks, for TFLOP/s and MFU: arithmetic, no torch (the planner uses it).

FLOPs per iteration as Megatron-LM counts them (Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters using Megatron-LM", appendix): a transformer of l layers, hidden size h, sequence s
and batch B costs 24·B·s·l·h²·(1 + s/(6h)) FLOPs forward, its output layer over a vocabulary V 2·B·s·h·V.
Forward and backward are three times each; full activation recompute runs the layers' forward once more
(four times), not the output layer's. That gives the paper's eq. 3 with recompute,
96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)), and without it 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h)), Megatron-LM's
num_floating_point_operations.
"""

from __future__ import annotations

# Dense tensor-core peaks in TFLOP/s from the vendors' data sheets (SXM parts; fp32 without TF32).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "v100": {"fp16": 125.0, "bf16": 0.0, "fp32": 15.7},
    "a100": {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5},
    "h100": {"fp16": 989.0, "bf16": 989.0, "fp32": 67.0},
    "h200": {"fp16": 989.0, "bf16": 989.0, "fp32": 67.0},
}


def flops_per_iteration(
    batch: int, seq: int, layers: int, hidden: int, vocab: int, recompute: bool = False
) -> float:
    passes = 4 if recompute else 3
    layers_forward = 24.0 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden))
    return passes * layers_forward + 3 * 2.0 * batch * seq * hidden * vocab


def datasheet_peak_flops(device: str, dtype: str) -> float:
    """Peak FLOP/s of one GPU from the data-sheet table; a ValueError for an unknown device or dtype."""
    if device not in PEAK_TFLOPS:
        raise ValueError(f"no peak FLOP/s entry for device {device!r} (known: {', '.join(PEAK_TFLOPS)})")
    peak = PEAK_TFLOPS[device][dtype]
    if not peak:
        raise ValueError(f"device {device} has no {dtype} support")
    return peak * 1e12
