"""The peak FLOP/s MFU divides by, for the device a rank really runs on.

A CUDA device whose name the data-sheet table knows takes that figure (dense tensor cores); any other device
(a CPU, an unlisted GPU) takes the rate of square matmuls measured on it once per process.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from bigscience_train.metrics.flops import PEAK_TFLOPS, datasheet_peak_flops

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        # A size's first matmul pays for its set-up (on a GPU, cuBLAS's handle and kernel choice).
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


def datasheet_name(cuda_name: str) -> str | None:
    """The table's key for a CUDA device name ("NVIDIA H100 80GB HBM3" is h100), or None."""
    words = cuda_name.lower().replace("-", " ").split()
    return next((key for key in PEAK_TFLOPS if key in words), None)


def device_peak_flops(device: torch.device, dtype: str) -> float:
    """Peak FLOP/s of `device` for matmuls in `dtype`: the data sheet's for known GPUs, else measured."""
    if device.type == "cuda":
        name = datasheet_name(torch.cuda.get_device_name(device))
        if name is not None:
            return datasheet_peak_flops(name, dtype)
    return measured_matmul_peak(TORCH_DTYPES[dtype], device=device.type)
