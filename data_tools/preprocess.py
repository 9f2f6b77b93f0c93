"""JSONL corpus to a Megatron .bin/.idx dataset (bigscience_train/data/indexed.py), in document order.

Batches of documents are encoded by a pool of worker processes, each returning a batch's ids as one array;
`imap` returns them in submission order, so the output does not depend on the number of workers. Byte-level
BPE tokenizers are encoded with tiktoken when it gives the same ids (data_tools/fast_encoder.py). A corpus
too big for one job is preprocessed as shards of contiguous lines (`shard`, `num_shards`) whose merge equals
the whole. Outputs appear under their final names only when complete.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bigscience_train.data.indexed import IndexedWriter, bin_path, idx_path, token_dtype
from bigscience_train.data.tokenizer import Tokenizer
from bigscience_train.fsutil import temporary_sibling
from data_tools.fast_encoder import Encode, build_encoder
from data_tools.jsonl import SkipLog, count_lines, expand_inputs, read_texts, shard_range

_SAMPLE_DOCUMENTS = 64
# What forked workers inherit: the encoder chosen (and checked) in the parent, the eod id and the token dtype.
_worker: tuple[Encode, int | None, type] | None = None


@dataclass
class PreprocessSummary:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    seconds: float = 0.0
    skips: SkipLog = field(default_factory=SkipLog)
    encoder: str = ""  # which encoder ran, and why (build_encoder)

    def __str__(self) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        return (
            f"documents: {self.documents:,}  tokens: {self.tokens:,}  seconds: {self.seconds:.1f} "
            f"({rate:,.0f} tokens/s)\n{self.skips.summary()}"
        )


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A batch's ids back to back (eod after each document when asked) and each document's length: two arrays
    cross the pipe faster than lists of ints, and the parent only writes them."""
    encode, eod, dtype = _worker
    ids = encode(texts)
    if eod is not None:
        for doc in ids:
            doc.append(eod)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    # fromiter raises OverflowError for an id the dtype cannot hold, where a cast would wrap it.
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


def _batches(texts: Iterator[str], size: int, summary: PreprocessSummary) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        summary.text_bytes += len(text.encode("utf-8"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _progress_bar():
    from tqdm import tqdm  # imported only for a terminal: batch jobs need not pay for it

    return tqdm(unit=" docs", desc="preprocess")


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer: str | Tokenizer,
    json_key: str = "text",
    append_eod: bool = True,
    workers: int = 1,
    strict: bool = False,
    batch_size: int = 256,
    progress: bool | None = None,
    shard: int = 0,
    num_shards: int = 1,
    fast: bool = True,
) -> PreprocessSummary:
    start = time.perf_counter()
    files = expand_inputs(inputs)
    # A path is a tokenizer.json; a GPT-2 vocab and merges pair comes loaded (Tokenizer(vocab_file=, merge_file=)).
    tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    summary = PreprocessSummary()
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    final_bin, final_idx = Path(bin_path(output_prefix)), Path(idx_path(output_prefix))
    tmp_bin, tmp_idx = temporary_sibling(final_bin), temporary_sibling(final_idx)
    lines = shard_range(count_lines(files), shard, num_shards) if num_shards > 1 else None
    sample = list(itertools.islice(read_texts(files, json_key, SkipLog(), False), _SAMPLE_DOCUMENTS))
    if workers > 1:
        # Each worker process encodes one batch at a time; a thread pool inside each would only contend.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker
    encode, summary.encoder = build_encoder(tokenizer, sample, fast)
    dtype = token_dtype(tokenizer.vocab_size)
    _worker = encode, tokenizer.eod if append_eod else None, dtype
    batches = _batches(read_texts(files, json_key, summary.skips, strict, lines), batch_size, summary)
    bar = _progress_bar() if (sys.stderr.isatty() if progress is None else progress) else None
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        with IndexedWriter(str(tmp_bin), dtype) as writer:
            encoded = map(_encode, batches) if pool is None else pool.imap(_encode, batches)
            for tokens, lengths in encoded:
                writer.add_documents(tokens, lengths)
                summary.tokens += len(tokens)
                summary.documents += len(lengths)
                if bar is not None:
                    bar.update(len(lengths))
                    bar.set_postfix_str(
                        f"{summary.text_bytes / 1e6 / (time.perf_counter() - start):.1f} MB/s"
                    )
            writer.finalize(str(tmp_idx))
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - start
    return summary
