"""The bundled tasks' `custom_dataset`: their JSON data read from this folder whatever the working directory
(lm-eval's `json` dataset would look for `data_files` relative to the working directory). Imports nothing of
ours, since lm-eval's CLI loads this file by its path."""

from __future__ import annotations

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_json(data_files: dict[str, str], **_metadata) -> datasets.DatasetDict:
    """A DatasetDict of each split's JSON-lines file; lm-eval passes the task's metadata and dataset_kwargs."""
    return datasets.load_dataset(
        "json", data_files={split: str(HERE / name) for split, name in data_files.items()}
    )
