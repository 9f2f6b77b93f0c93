"""JSONL corpus to a Megatron .bin/.idx dataset (megatron-core's IndexedDatasetBuilder), in document order.

Batches of documents are encoded by a pool of worker processes; `imap` returns them in submission order,
so the output does not depend on the number of workers. Byte-level BPE tokenizers are encoded with tiktoken
when it gives the same ids (data_tools/fast_encoder.py). A corpus too big for one job is preprocessed as
shards of contiguous lines (`shard`, `num_shards`) whose merge equals the whole. Outputs appear under
their final names only when complete.
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

from bigscience_train.data.indexed import IndexedDatasetBuilder, bin_path, idx_path
from bigscience_train.data.tokenizer import Tokenizer
from bigscience_train.fsutil import temporary_sibling
from data_tools.fast_encoder import Encode, build_encoder
from data_tools.jsonl import SkipLog, count_lines, expand_inputs, read_texts, shard_range

_SAMPLE_DOCUMENTS = 64
_worker_encode: Encode | None = None


@dataclass
class PreprocessSummary:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    seconds: float = 0.0
    skips: SkipLog = field(default_factory=SkipLog)

    def __str__(self) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        return (
            f"documents: {self.documents:,}  tokens: {self.tokens:,}  seconds: {self.seconds:.1f} "
            f"({rate:,.0f} tokens/s)\n{self.skips.summary()}"
        )


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _encode(texts: list[str]) -> list[list[int]]:
    return _worker_encode(texts)


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


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer_path: str,
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
    from tqdm import tqdm

    start = time.perf_counter()
    files = expand_inputs(inputs)
    tokenizer = Tokenizer(tokenizer_path)
    summary = PreprocessSummary()
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    final_bin, final_idx = Path(bin_path(output_prefix)), Path(idx_path(output_prefix))
    tmp_bin, tmp_idx = temporary_sibling(final_bin), temporary_sibling(final_idx)
    lines = shard_range(count_lines(files), shard, num_shards) if num_shards > 1 else None
    sample = list(itertools.islice(read_texts(files, json_key, SkipLog(), False), _SAMPLE_DOCUMENTS))
    if workers > 1:
        # Each worker process encodes one batch at a time; a thread pool inside each would only contend.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_encode
    # Forked workers inherit the encoder chosen (and checked) here.
    _worker_encode, summary.encoder = build_encoder(tokenizer_path, sample, fast)
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=token_dtype(tokenizer.vocab_size))
    batches = _batches(read_texts(files, json_key, summary.skips, strict, lines), batch_size, summary)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(unit=" docs", disable=not show, desc="preprocess")
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        encoded = map(_encode, batches) if pool is None else pool.imap(_encode, batches)
        for ids_batch in encoded:
            for ids in ids_batch:
                if append_eod:
                    ids.append(tokenizer.eod)
                builder.add_document(np.asarray(ids), [len(ids)])
                summary.tokens += len(ids)
            summary.documents += len(ids_batch)
            bar.update(len(ids_batch))
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{summary.text_bytes / 1e6 / elapsed:.1f} MB/s")
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - start
    return summary
