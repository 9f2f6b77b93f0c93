"""Preprocessing throughput: our `preprocess` against a Megatron-LM-style per-document baseline.

Corpus: the Python standard library (tests included) split into paragraph-sized documents (~30 MB), gzipped
JSONL; a byte-level BPE tokenizer of GPT-2's size trained on it. Three figures, 2 workers each:
- ours, end to end from .jsonl.gz to finished .bin/.idx;
- the baseline in the style of Megatron-LM's tools/preprocess_data.py: one json.loads and one call of
  transformers' fast tokenizer per document in a multiprocessing.Pool.imap with chunks, one add_document per
  document in the parent;
- the raw fast encoder (tiktoken, 2 threads) on the same texts already in memory.
Outputs of ours and the baseline must be identical byte for byte. Peak memory of ours is measured on the corpus
and on the corpus twice over: streaming keeps it flat.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import report
from bigscience_train.data.indexed import IndexedDatasetBuilder
from data_tools.fast_encoder import tiktoken_encoding
from data_tools.tokenizer_train import train_tokenizer

DOC_CHARS = 3500


def paragraph_documents() -> list[str]:
    """Blank-line paragraphs of every stdlib .py file, grouped into documents of about DOC_CHARS."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        current = ""
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            current += para + "\n\n"
            if len(current) >= DOC_CHARS:
                docs.append(current)
                current = ""
        if current.strip():
            docs.append(current)
    return docs


def write_corpus(docs: list[str], path: Path, copies: int = 1) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for _ in range(copies):
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")


class _BaselineEncoder:
    """Megatron-LM's Encoder: the tokenizer is built in each worker, one document per call."""

    def __init__(self, tokenizer_path: str):
        self.tokenizer_path = tokenizer_path

    def initializer(self) -> None:
        from transformers import PreTrainedTokenizerFast

        _BaselineEncoder.tokenizer = PreTrainedTokenizerFast(tokenizer_file=self.tokenizer_path)
        _BaselineEncoder.eod = _BaselineEncoder.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def encode(self, line: str):
        text = json.loads(line)["text"]
        ids = _BaselineEncoder.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [_BaselineEncoder.eod], len(line)


def baseline(corpus: Path, tokenizer: str, prefix: str, workers: int) -> float:
    start = time.perf_counter()
    encoder = _BaselineEncoder(tokenizer)
    with (
        gzip.open(corpus, "rt", encoding="utf-8") as fin,
        mp.get_context("fork").Pool(workers, encoder.initializer) as pool,
    ):
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for ids, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(np.asarray(ids), [len(ids)])
        builder.finalize(prefix + ".idx")
    return time.perf_counter() - start


def ours(corpus: Path, tokenizer: str, prefix: str, workers: int) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of `bigscience data preprocess` in its own process."""
    code = (
        "import resource, time, sys\n"
        "from data_tools.preprocess import preprocess\n"
        "t = time.perf_counter()\n"
        f"s = preprocess([{str(corpus)!r}], {prefix!r}, {tokenizer!r}, workers={workers}, progress=False)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
        "print(s.encoder, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, rss = map(float, done.stdout.split())
    print(f"  ours: {done.stderr.strip()}")
    return seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=50257)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        docs = paragraph_documents()
        corpus, double = d / "corpus.jsonl.gz", d / "double.jsonl.gz"
        write_corpus(docs, corpus)
        write_corpus(docs, double, copies=2)
        plain = d / "plain.jsonl"
        plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:3000]))
        tokenizer = str(d / "tokenizer.json")
        train_tokenizer([str(plain)], Path(tokenizer), args.vocab_size, show_progress=False)
        mb = sum(len(t.encode()) for t in docs) / 1e6
        print(f"corpus: {len(docs):,} documents, {mb:.1f} MB of text")

        ours_s, ours_rss = ours(corpus, tokenizer, str(d / "ours"), args.workers)
        _, double_rss = ours(double, tokenizer, str(d / "double"), args.workers)
        base_s = baseline(corpus, tokenizer, str(d / "base"), args.workers)
        identical = all(
            Path(f"{d}/ours{s}").read_bytes() == Path(f"{d}/base{s}").read_bytes() for s in (".bin", ".idx")
        )

        encoding, _ = tiktoken_encoding(tokenizer)
        start = time.perf_counter()
        encoding.encode_ordinary_batch(docs, num_threads=args.workers)
        raw_s = time.perf_counter() - start
        tokens = (Path(f"{d}/ours.bin").stat().st_size // 2) - len(docs)

    figures = {
        "documents": len(docs),
        "megabytes": mb,
        "tokens": tokens,
        "ours_tokens_per_s": tokens / ours_s,
        "baseline_tokens_per_s": tokens / base_s,
        "raw_encoder_tokens_per_s": tokens / raw_s,
        "identical_output": identical,
        "ours_peak_rss_mb": ours_rss,
        "ours_peak_rss_mb_on_2x_corpus": double_rss,
        "baseline_self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    ratios = {
        "ours vs per-document baseline": {"value": base_s / ours_s, "target": 3.0},
        "ours vs raw encoder": {"value": raw_s / ours_s, "target": 0.7},
        "identical output (1 = yes)": {"value": float(identical), "target": 1.0},
        # Flat memory: the run on twice the corpus peaks no higher than 1.1x the run on the corpus.
        "peak memory flatness (1x / 2x corpus)": {"value": ours_rss / double_rss, "target": 1 / 1.1},
    }
    report("preprocess", figures, ratios)


if __name__ == "__main__":
    main()
