"""Trains a byte-level BPE tokenizer (GPT-2 / BLOOM style) on a JSONL corpus with Hugging Face tokenizers."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bigscience_train.fsutil import atomic_path
from data_tools.jsonl import SkipLog, expand_inputs, read_texts

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>"]


def train_tokenizer(
    inputs: list[str], output: Path, vocab_size: int, key: str = "text", show_progress: bool = True
) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    skips = SkipLog()
    tokenizer.train_from_iterator(read_texts(expand_inputs(inputs), key, skips, strict=False), trainer)
    with atomic_path(output) as tmp:
        tokenizer.save(str(tmp))
    return tokenizer
