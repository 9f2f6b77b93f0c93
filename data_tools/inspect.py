"""A look inside a .bin/.idx dataset: counts, document length histogram, one decoded document."""

from __future__ import annotations

import numpy as np

from bigscience_train.data.indexed import open_indexed


def describe(prefix: str, tokenizer_path: str | None = None, sample: int = 0, bins: int = 10) -> str:
    dataset = open_indexed(prefix)
    lengths = dataset.sequence_lengths
    lines = [
        f"{prefix}: {dataset.num_documents:,} documents, {len(lengths):,} sequences, "
        f"{dataset.num_tokens:,} tokens, dtype {np.dtype(dataset.dtype).name}"
    ]
    if len(lengths):
        lines.append(
            f"tokens per sequence: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}"
        )
        counts, edges = np.histogram(lengths, bins=bins)
        width = max(counts.max(), 1)
        for count, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
            lines.append(f"  {lo:>9.0f} - {hi:<9.0f} {count:>7} {'#' * int(40 * count / width)}")
    if tokenizer_path is not None:
        if not 0 <= sample < len(dataset):
            raise ValueError(f"--sample {sample} is out of range: {prefix} has {len(dataset)} sequences")
        from bigscience_train.data.tokenizer import Tokenizer  # tokenizers is loaded only to decode a sample

        ids = dataset[sample].tolist()
        lines.append(f"sample {sample} ({len(ids)} tokens):\n{Tokenizer(tokenizer_path).decode(ids)}")
    return "\n".join(lines)
