"""Autocast regions for bf16/fp16: parameters and gradients stay fp32, matmuls run in the half dtype."""

from __future__ import annotations

import contextlib

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(dtype: str, device: torch.device):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])
