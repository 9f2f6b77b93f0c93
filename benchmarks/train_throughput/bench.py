"""Training tokens/s of our trainer against a plain PyTorch loop over Hugging Face's BloomForCausalLM.

Same shape (6 layers, hidden 512, 8 heads, vocab 8192, seq 512), batch 4, fp32, same threads, one process.
Ours runs `Trainer.train_step` (data from a .bin/.idx dataset, AdamW, clipping); the peer runs forward,
cross-entropy, backward and AdamW on random tokens. MFU is against a 2048x2048 fp32 matmul measured here.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import time_per_call, write_result
from bigscience_train.config import load_config
from bigscience_train.data.indexed import IndexedDatasetBuilder
from bigscience_train.metrics.flops import flops_per_iteration, measured_matmul_peak
from bigscience_train.parallel.env import init_parallel
from bigscience_train.train.loop import Trainer
from data_tools.tokenizer_train import train_tokenizer

LAYERS, HIDDEN, HEADS, VOCAB, SEQ, BATCH = 6, 512, 8, 8192, 512, 4


def make_data(d: Path) -> tuple[str, str]:
    corpus = d / "corpus.jsonl"
    corpus.write_text('{"text": "benchmark text"}\n')
    tokenizer = d / "tokenizer.json"
    train_tokenizer([str(corpus)], tokenizer, vocab_size=300, show_progress=False)
    prefix = str(d / "random_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(400):
        doc = rng.integers(2, VOCAB, size=2048)
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix, str(tokenizer)


def ours(d: Path, steps: int, position: str) -> float:
    prefix, tokenizer = make_data(d)
    cfg = load_config(
        [
            f"model.num_layers={LAYERS}",
            f"model.hidden_size={HIDDEN}",
            f"model.num_heads={HEADS}",
            f"model.vocab_size={VOCAB}",
            f"model.seq_length={SEQ}",
            f"model.position={position}",
            f"train.micro_batch_size={BATCH}",
            f"train.global_batch_size={BATCH}",
            "train.iters=100000",
            f"data.blend=[{prefix}]",
            f"data.tokenizer={tokenizer}",
            f"data.cache_dir={d / 'cache'}",
            f"run_dir={d / 'run'}",
        ]
    )
    trainer = Trainer(cfg, init_parallel(1, 1, None))
    return time_per_call(trainer.train_step, warmup=2, repeats=steps)


def hf_bloom(steps: int) -> float:
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return time_per_call(step, warmup=2, repeats=steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = BATCH * SEQ
    flops = flops_per_iteration(BATCH, SEQ, LAYERS, HIDDEN, VOCAB)
    peak = measured_matmul_peak(torch.float32, seconds=2.0)
    hf_s = hf_bloom(args.steps)
    figures = {
        "threads": args.threads,
        "matmul_peak_gflops": peak / 1e9,
        "hf_bloom_tokens_per_s": tokens / hf_s,
    }
    ratios = {}
    for position in ("alibi", "learned"):
        with tempfile.TemporaryDirectory() as d:
            s = ours(Path(d), args.steps, position)
        figures[f"ours_{position}_tokens_per_s"] = tokens / s
        figures[f"ours_{position}_gflops"] = flops / s / 1e9
        ratios[f"{position} tokens/s vs HF Bloom"] = {"value": hf_s / s, "target": 1.4}
        ratios[f"{position} MFU vs measured matmul peak"] = {"value": flops / s / peak, "target": 0.75}
    for key, value in figures.items():
        print(f"{key:32s} {value:10.1f}")
    for key, r in ratios.items():
        print(f"{key:40s} {r['value']:6.2f}  (target {r['target']})")
    write_result("train_throughput", {"figures": figures, "ratios": ratios})


if __name__ == "__main__":
    main()
