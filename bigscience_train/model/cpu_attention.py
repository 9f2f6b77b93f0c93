"""Fused causal attention, with or without ALiBi, for fp32 training on CPU (cpu_attention.cpp).

PyTorch's CPU SDPA takes ALiBi only as a dense bias and so computes every score of the rows it is given, the
masked ones too; its kernels ran at about half the matmul peak here. These compute the bias from the slopes,
skip the key blocks above the diagonal (56% of the scores at sequence 512) and pack each head's operands into
contiguous blocks. Forward and backward of one layer: 20-21 ms against 31-32 ms for SDPA in query chunks
(batch 4, 8 heads of 64, sequence 512, 2 cores).

The kernels are compiled on first use by torch.utils.cpp_extension, for the vector instructions PyTorch
itself uses on this CPU, and cached under TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions). They are custom
ops, so a compiled block keeps them in its graph.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_attention.cpp")
# Compiler flags for each of PyTorch's CPU capabilities; anything else builds ATen's portable vector code.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


@functools.cache
def _kernels() -> ModuleType | None:
    """The compiled kernels, or None where they cannot be built (no C++ compiler): attention then takes SDPA."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:
        # torch runs `ninja` from PATH; pip's ninja (a dependency) sits in the environment's bin directory,
        # which is on PATH only while the environment is activated.
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    isa = torch.backends.cpu.get_cpu_capability()
    isa = isa if isa in _ISA_FLAGS else "DEFAULT"
    flags = [
        "-O3",
        "-fopenmp",
        f"-DCPU_CAPABILITY={isa}",
        f"-DCPU_CAPABILITY_{isa}",
        *_ISA_FLAGS.get(isa, []),
    ]
    try:
        return load(
            f"bigscience_cpu_attention_{isa.lower()}",
            [str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
        )
    except (OSError, RuntimeError) as e:
        log.warning("could not build %s, CPU attention takes SDPA: %s", _SOURCE.name, e)
        return None


def available(head_dim: int) -> bool:
    """Whether the kernels are built and take this head size (a multiple of the CPU's vector width)."""
    kernels = _kernels()
    return kernels is not None and head_dim % kernels.vector_width() == 0


@torch.library.custom_op("bigscience_train::cpu_causal_attention", mutates_args=())
def _attention(qkv: torch.Tensor, slopes: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _kernels().forward(qkv, slopes, scale)
    return out, lse


@_attention.register_fake
def _(qkv, slopes, scale):
    b, s, h, _, d = qkv.shape
    return qkv.new_empty(b, s, h, d).transpose(1, 2), qkv.new_empty(b, h, s)


@torch.library.custom_op("bigscience_train::cpu_causal_attention_backward", mutates_args=())
def _attention_backward(
    grad: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return _kernels().backward(grad, qkv, out, lse, slopes, scale)


@_attention_backward.register_fake
def _(grad, qkv, out, lse, slopes, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _save_for_backward(ctx, inputs, output) -> None:
    qkv, slopes, ctx.scale = inputs
    ctx.save_for_backward(qkv, *output, slopes)


def _backward(ctx, grad_out, grad_lse):
    qkv, out, lse, slopes = ctx.saved_tensors
    return _attention_backward(_last_dim_contiguous(grad_out), qkv, out, lse, slopes, ctx.scale), None, None


_attention.register_autograd(_backward, setup_context=_save_for_backward)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def causal_attention(qkv: torch.Tensor, alibi_slopes: torch.Tensor) -> torch.Tensor:
    """Softmax attention of each query over the keys up to its own, scaled by 1/sqrt(head_dim).

    qkv: fp32 (batch, seq, heads, 3, head_dim) on CPU, per head [q, k, v] (BLOOM's fused projection): the
    gradient comes back in that one tensor, with no stack of three. alibi_slopes: fp32 (heads,), or empty for
    no bias. Returns (batch, heads, seq, head_dim), laid out in memory as (batch, seq, heads, head_dim)."""
    out, _ = _attention(_last_dim_contiguous(qkv), alibi_slopes, qkv.shape[-1] ** -0.5)
    return out
