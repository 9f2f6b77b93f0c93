"""Model FLOPs and device peaks, for TFLOP/s and MFU.

FLOPs per iteration as Megatron-LM counts them (Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters using Megatron-LM", appendix): a transformer of l layers, hidden size h, sequence s
and batch B costs 24·B·s·l·h²·(1 + s/(6h)) FLOPs forward, its output layer over a vocabulary V 2·B·s·h·V.
Forward and backward are three times each; full activation recompute runs the layers' forward once more
(four times), not the output layer's. That gives the paper's eq. 3 with recompute,
96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)), and without it 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h)), Megatron-LM's
num_floating_point_operations.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

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


def matmul_peak_probe(
    dtype: torch.dtype = torch.float32, max_n: int = 2048, seconds: float = 0.5, device: str = "cpu"
) -> tuple[Callable[[], None], float]:
    """A call that runs square matmuls on this device for about `seconds` (with the current thread count on
    CPU), and the FLOPs of one call: FLOPs over its time is the device's practical peak. A benchmark can time
    it in turns with what it measures, so both see the same moments of a machine whose speed drifts.

    The size doubles from 256 up to max_n while one matmul stays under 50 ms, so dtypes the CPU only emulates
    (bf16/fp16 without hardware support) are measured in a second, not minutes.
    """

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    n = 256
    while n < max_n:
        a = torch.randn(n, n, dtype=dtype, device=device)
        # A size's first matmul pays for its set-up (on a GPU, cuBLAS's handle and kernel choice: ~0.1 s).
        torch.matmul(a, a)
        sync()
        start = time.perf_counter()
        torch.matmul(a, a)
        sync()
        if time.perf_counter() - start > 0.05:
            break
        n *= 2
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    torch.matmul(a, b)  # warm-up: thread pool and caches
    sync()
    start = time.perf_counter()
    torch.matmul(a, b)
    sync()
    reps = max(1, round(seconds / (time.perf_counter() - start)))

    def run() -> None:
        for _ in range(reps):
            torch.matmul(a, b)
        sync()

    return run, 2.0 * n**3 * reps


@functools.cache
def measured_matmul_peak(
    dtype: torch.dtype = torch.float32, max_n: int = 2048, seconds: float = 0.5, device: str = "cpu"
) -> float:
    """FLOP/s of square matmuls on this device: its practical peak, measured once per process."""
    run, flops = matmul_peak_probe(dtype, max_n, seconds, device)
    start = time.perf_counter()
    run()
    return flops / (time.perf_counter() - start)


def peak_flops(device: str, dtype: str) -> float:
    """Peak FLOP/s of one device: the data-sheet figure for GPUs, a measured matmul for the CPU."""
    if device == "cpu":
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        return measured_matmul_peak(torch_dtype)
    if device not in PEAK_TFLOPS:
        raise ValueError(
            f"cluster.device={device!r} has no peak FLOP/s entry (known: cpu, {', '.join(PEAK_TFLOPS)})"
        )
    peak = PEAK_TFLOPS[device][dtype]
    if not peak:
        raise ValueError(f"cluster.device={device} has no {dtype} support")
    return peak * 1e12
