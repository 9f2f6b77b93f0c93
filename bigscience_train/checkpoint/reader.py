"""Reading a committed checkpoint outside training: where it is, what it holds, one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from bigscience_train.checkpoint.paths import latest_checkpoint
from bigscience_train.checkpoint.safe_load import SafeReader, safe_dcp_load

MODEL_PREFIX = "model."


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or the `latest` one of a checkpoints/ directory or of a run directory."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / "meta.json").is_file():
            return root
        step = latest_checkpoint(root)
        if step is not None:
            return step
    raise FileNotFoundError(
        f"{path} is not a checkpoint (no meta.json), a checkpoints directory or a run directory"
    )


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def _model_tensors(reader: SafeReader) -> dict[str, TensorStorageMetadata]:
    return {
        key[len(MODEL_PREFIX) :]: value
        for key, value in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(value, TensorStorageMetadata)
    }


def model_tensors_metadata(path: Path) -> dict[str, TensorStorageMetadata]:
    """Model tensor names (HF Bloom names, without the 'model.' prefix) and their global shape and dtype."""
    return _model_tensors(SafeReader(path))


def iter_model_tensors(path: Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) model tensors, one at a time: memory holds one tensor, whatever the model's size."""
    reader = SafeReader(path)
    tensors = _model_tensors(reader)
    for name in names if names is not None else list(tensors):
        meta = tensors[name]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        safe_dcp_load({MODEL_PREFIX + name: tensor}, reader, no_dist=True)
        yield name, tensor
