"""MFU of gpt_1b3 (24 layers x 2048, seq 2048, ALiBi) training on one GPU: bf16, torch.compile per block.

Ours runs `Trainer.train_step` (data from a .bin/.idx dataset, AdamW, clipping), once per attention kernel
(`model.attention`: SDPA with ALiBi as an additive bias, FlexAttention with ALiBi in the kernel), each model
freed before the next is built. MFU is model FLOPs (Megatron's formula) per second over the device's dense
bf16 peak from its data sheet, and over a square bf16 matmul measured in the same run. `--profile` prints
where a step's GPU time goes. Needs a GPU: on a CPU it records that it was skipped.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import report, time_per_call, write_result
from benchmarks.train_throughput.bench import make_data
from bigscience_train.config import load_config
from bigscience_train.metrics.flops import datasheet_peak_flops, flops_per_iteration
from bigscience_train.metrics.peak import datasheet_name, measured_matmul_peak
from bigscience_train.model.shape import AttentionKernel
from bigscience_train.parallel.env import init_parallel
from bigscience_train.train.loop import Trainer


def print_profile(step, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
    print(
        prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument(
        "--device-name", help="data-sheet peak to use (h100, h200, a100); default: from the GPU's name"
    )
    kernels = [a.value for a in AttentionKernel]
    parser.add_argument("--attention", nargs="+", default=kernels, choices=kernels)
    parser.add_argument("--profile", action="store_true", help="print the GPU time per kernel of 2 steps")
    parser.add_argument(
        "overrides", nargs="*", help="more Hydra overrides, e.g. parallel.recompute=selective"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("train_mfu: needs a GPU, skipped")
        write_result("train_mfu", {"figures": {}, "ratios": {}, "skipped": "needs a GPU"})
        return
    device_name = args.device_name or datasheet_name(torch.cuda.get_device_name())
    if device_name is None:
        sys.exit(f"no data-sheet peak for {torch.cuda.get_device_name()}: give --device-name")
    spec = datasheet_peak_flops(device_name, "bf16")
    measured = measured_matmul_peak(torch.bfloat16, max_n=8192, seconds=2.0, device="cuda")
    figures = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "micro_batch": args.micro_batch,
        "matmul_peak_tflops": measured / 1e12,
    }
    ratios = {}
    with tempfile.TemporaryDirectory() as d:
        prefix, tokenizer = make_data(Path(d))
        penv = init_parallel()
        for attention in args.attention:
            cfg = load_config(
                [
                    "model=gpt_1b3",
                    f"model.attention={attention}",
                    "precision=bf16",
                    "train.compile=true",
                    f"train.micro_batch_size={args.micro_batch}",
                    f"train.global_batch_size={args.micro_batch}",
                    "train.iters=100000",
                    f"data.blend=[{prefix}]",
                    f"data.tokenizer={tokenizer}",
                    f"data.cache_dir={d}/cache",
                    f"run_dir={d}/run",
                    "logging.carbon=false",
                    f"cluster.device={device_name}",
                    *args.overrides,
                ]
            )
            torch.cuda.reset_peak_memory_stats()
            trainer = Trainer(cfg, penv)
            seconds = time_per_call(trainer.train_step, warmup=3, repeats=args.steps)
            m = cfg.model
            flops = flops_per_iteration(
                args.micro_batch, m.seq_length, m.num_layers, m.hidden_size, trainer.shape.vocab_size
            )
            rate = flops / seconds
            figures[f"{attention}_step_seconds"] = seconds
            figures[f"{attention}_tokens_per_s"] = args.micro_batch * m.seq_length / seconds
            figures[f"{attention}_model_tflops"] = rate / 1e12
            figures[f"{attention}_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            ratios[f"gpt_1b3 {attention} MFU vs data-sheet bf16 peak"] = {
                "value": rate / spec,
                "target": 0.45,
            }
            ratios[f"gpt_1b3 {attention} MFU vs measured matmul peak"] = {
                "value": rate / measured,
                "target": 0.45,
            }
            # Each variant's figures as soon as they are measured: a later variant may fail.
            print(
                f"{attention}: {seconds:.3f} s/step, {rate / 1e12:.0f} TFLOP/s, MFU {rate / spec:.3f} of the "
                f"data sheet, {rate / measured:.3f} of the matmul",
                flush=True,
            )
            if args.profile:
                print(f"-- {attention}: GPU time per kernel, 2 steps")
                print_profile(trainer.train_step)
            del trainer
            gc.collect()
            torch.cuda.empty_cache()
    report("train_mfu", figures, ratios)


if __name__ == "__main__":
    main()
