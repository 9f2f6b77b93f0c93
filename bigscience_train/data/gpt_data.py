"""Blended GPT samples from .bin/.idx prefixes through megatron-core's BlendedMegatronDatasetBuilder.

Samples are (seq_length + 1)-token windows that cross document boundaries, shuffled with the data seed;
the index files are built once into data.cache_dir (rank 0 builds, the others wait) and reused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from bigscience_train.data.blend import parse_blend
from bigscience_train.data.indexed import open_indexed
from bigscience_train.data.megatron_datasets import (
    BlendedMegatronDatasetBuilder,
    GPTDataset,
    GPTDatasetConfig,
)
from bigscience_train.data.tokenizer import Tokenizer


@dataclass
class Splits:
    train: object
    valid: object | None
    test: object | None


SPLIT_NAMES = ("train", "valid", "test")


def build_splits(
    data_cfg,
    seq_length: int,
    tokenizer: Tokenizer,
    sizes: tuple[int | None, ...],
    blend: list[str] | None = None,
    split: str | None = None,
) -> Splits:
    """sizes: samples wanted from (train, valid, test); None builds one epoch of that split (unweighted blends),
    0 none of it. blend and split, when given, replace data.blend and data.split (a named validation set's)."""
    split = str(data_cfg.split if split is None else split)
    prefixes, weights = parse_blend(list(data_cfg.blend if blend is None else blend))
    # Open each dataset first: a clear error naming the file, before megatron-core's bare assertions.
    documents = {prefix: len(open_indexed(prefix).document_indices) - 1 for prefix in prefixes}
    config = GPTDatasetConfig(
        random_seed=data_cfg.seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=data_cfg.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=data_cfg.reset_position_ids,
        reset_attention_mask=data_cfg.reset_attention_mask,
        eod_mask_loss=data_cfg.eod_mask_loss,
        create_attention_mask=False,
    )
    # megatron-core builds the splits its matrix holds: a split nobody reads is left out of it.
    config.split_matrix = [
        None if n == 0 else part for part, n in zip(config.split_matrix, sizes, strict=True)
    ]
    _check_split_documents(config.split_matrix, documents, sizes, split)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    is_built_on_rank = lambda: True  # noqa: E731 - every rank reads its own samples
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, list(sizes), is_built_on_rank, config
    ).build()
    return Splits(train, valid, test)


def _check_split_documents(split_matrix, documents: dict[str, int], sizes, split: str) -> None:
    """megatron-core loops forever when asked for samples from a split that holds no documents."""
    for i, (name, wanted) in enumerate(zip(SPLIT_NAMES, sizes, strict=True)):
        if split_matrix[i] is None or not wanted:
            continue
        begin, end = split_matrix[i]
        for prefix, n in documents.items():
            if round(end * n) - round(begin * n) == 0:
                raise ValueError(
                    f"data.split={split!r} leaves the {name} split of {prefix} without documents "
                    f"({n} documents in all); give that split a larger share or use more data"
                )


def collate(dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    """GPTDataset samples stacked into a micro batch: tokens, labels and loss mask, and what the model needs
    for the dataset's document flags: position ids (reset after each EOD, computed by megatron-core) and
    document ids (from which attention builds its block-diagonal causal mask)."""
    samples = [dataset[i] for i in indices]
    config = dataset.config
    keys = ("tokens", "labels", "loss_mask") + (("position_ids",) if config.reset_position_ids else ())
    batch = {key: torch.stack([s[key] for s in samples]) for key in keys}
    if config.reset_attention_mask:
        batch["document_ids"] = document_ids(batch["tokens"], config.tokenizer.eod)
    return batch


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Each token's document within its sample (batch, seq): the count of EOD tokens before it, so that an
    EOD closes its own document, as Megatron's reset attention mask has it."""
    ends = tokens == eod
    return ends.cumsum(-1) - ends.long()
