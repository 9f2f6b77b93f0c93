"""Blended GPT samples from .bin/.idx prefixes through megatron-core's BlendedMegatronDatasetBuilder.

Samples are (seq_length + 1)-token windows that cross document boundaries, shuffled with the data seed;
the index files are built once into data.cache_dir (rank 0 builds, the others wait) and reused.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from bigscience_train.data.blend import parse_blend
from bigscience_train.data.indexed import open_indexed
from bigscience_train.data.tokenizer import Tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig


@dataclass
class Splits:
    train: object
    valid: object | None
    test: object | None


SPLIT_NAMES = ("train", "valid", "test")


def build_splits(data_cfg, seq_length: int, tokenizer: Tokenizer, sizes: tuple[int | None, ...]) -> Splits:
    """sizes: samples wanted from (train, valid, test); None builds one epoch of that split (unweighted blends)."""
    prefixes, weights = parse_blend(list(data_cfg.blend))
    # Open each dataset first: a clear error naming the file, before megatron-core's bare assertions.
    documents = {prefix: len(open_indexed(prefix).document_indices) - 1 for prefix in prefixes}
    config = GPTDatasetConfig(
        random_seed=data_cfg.seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=str(data_cfg.split),
        path_to_cache=data_cfg.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    _check_split_documents(config.split_matrix, documents, sizes, data_cfg.split)
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
    """GPTDataset samples stacked into a micro batch: tokens, labels and loss mask."""
    samples = [dataset[i] for i in indices]
    return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")}
