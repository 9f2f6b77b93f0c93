"""Training tokens/s of our trainer against a plain PyTorch loop over Hugging Face's BloomForCausalLM.

Same shape (6 layers, hidden 512, 8 heads, vocab 8192, seq 512, ALiBi), batch 4, same dtype and threads, one
process: fp32 on CPU, bf16 autocast on a GPU. Ours runs `Trainer.train_step` (data from a .bin/.idx dataset,
AdamW, clipping); the peer runs forward, cross-entropy, backward, clipping and AdamW on random tokens. Both
are warmed up, then timed in turns with a square matmul of the same dtype, whose rate is the peak the MFU is
taken against: a drift of the machine's speed falls on all three alike.

The warm-up is long because on CPU glibc's allocator hands large blocks back to the kernel until its
thresholds have grown, and HF Bloom's first steps, page-faulting their fresh activations in, would be counted
against the peer.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import report, time_interleaved
from bigscience_train.config import load_config
from bigscience_train.data.indexed import IndexedWriter
from bigscience_train.metrics.flops import flops_per_iteration
from bigscience_train.metrics.peak import matmul_peak_probe
from bigscience_train.parallel.env import init_parallel
from bigscience_train.parallel.precision import autocast
from bigscience_train.train.loop import Trainer
from data_tools.tokenizer_train import train_tokenizer

LAYERS, HIDDEN, HEADS, VOCAB, SEQ, BATCH = 6, 512, 8, 8192, 512, 4


def make_data(d: Path) -> tuple[str, str]:
    """400 documents of 2,048 random tokens, and a tokenizer the config can name (its ids are not used)."""
    corpus = d / "corpus.jsonl"
    corpus.write_text('{"text": "benchmark text"}\n')
    tokenizer = d / "tokenizer.json"
    train_tokenizer([str(corpus)], tokenizer, vocab_size=300, show_progress=False)
    prefix = str(d / "random_text_document")
    lengths = np.full(400, 2048)
    with IndexedWriter(prefix + ".bin", np.uint16) as writer:
        writer.add_documents(np.random.default_rng(0).integers(2, VOCAB, size=int(lengths.sum())), lengths)
        writer.finalize(prefix + ".idx")
    return prefix, str(tokenizer)


def ours(d: Path, precision: str) -> Callable[[], object]:
    prefix, tokenizer = make_data(d)
    cfg = load_config(
        [
            f"model.num_layers={LAYERS}",
            f"model.hidden_size={HIDDEN}",
            f"model.num_heads={HEADS}",
            f"model.vocab_size={VOCAB}",
            f"model.seq_length={SEQ}",
            "model.position=alibi",
            f"train.micro_batch_size={BATCH}",
            f"train.global_batch_size={BATCH}",
            "train.iters=100000",
            f"data.blend=[{prefix}]",
            f"data.tokenizer={tokenizer}",
            f"data.cache_dir={d / 'cache'}",
            f"run_dir={d / 'run'}",
            f"precision={precision}",
            "logging.carbon=false",
        ]
    )
    # train_step ends with loss.item(): a GPU is synchronised at each step.
    return Trainer(cfg, init_parallel()).train_step


def hf_bloom(precision: str, device: str) -> Callable[[], object]:
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    model = BloomForCausalLM(config).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, torch.device(device)):
            logits = model(input_ids=tokens[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of each")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each, taken in turns")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16" if device == "cuda" else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    probe, probe_flops = matmul_peak_probe(dtype, max_n=8192 if device == "cuda" else 2048, device=device)
    with tempfile.TemporaryDirectory() as d:
        steps = {"ours": ours(Path(d), precision), "hf": hf_bloom(precision, device), "peak": probe}
        seconds = time_interleaved(steps, warmup=args.warmup, rounds=args.rounds)
    tokens = BATCH * SEQ
    flops = flops_per_iteration(BATCH, SEQ, LAYERS, HIDDEN, VOCAB)
    peak = probe_flops / seconds["peak"]
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads",
        "precision": precision,
        "matmul_peak_gflops": peak / 1e9,
        "hf_bloom_tokens_per_s": tokens / seconds["hf"],
        "ours_tokens_per_s": tokens / seconds["ours"],
        "ours_model_gflops": flops / seconds["ours"] / 1e9,
        "ours_mfu_vs_measured_matmul": flops / seconds["ours"] / peak,
    }
    ratios = {"ours tokens/s vs HF Bloom": {"value": seconds["hf"] / seconds["ours"], "target": 1.0}}
    report("train_throughput", figures, ratios)


if __name__ == "__main__":
    main()
