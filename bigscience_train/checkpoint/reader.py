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


def _tensors(reader: SafeReader) -> dict[str, TensorStorageMetadata]:
    return {
        key: value
        for key, value in reader.read_metadata().state_dict_metadata.items()
        if isinstance(value, TensorStorageMetadata)
    }


def _model_tensors(reader: SafeReader) -> dict[str, TensorStorageMetadata]:
    return {
        key[len(MODEL_PREFIX) :]: v for key, v in _tensors(reader).items() if key.startswith(MODEL_PREFIX)
    }


def model_tensors_metadata(path: Path) -> dict[str, TensorStorageMetadata]:
    """Model tensor names (HF Bloom names, without the 'model.' prefix) and their global shape and dtype."""
    return _model_tensors(SafeReader(path))


def iter_model_tensors(path: Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) model tensors, one at a time: memory holds one tensor, whatever the model's size."""
    names = list(model_tensors_metadata(path)) if names is None else names
    for key, tensor in iter_tensors(path, [MODEL_PREFIX + name for name in names]):
        yield key[len(MODEL_PREFIX) :], tensor


def tensors_metadata(path: Path) -> dict[str, TensorStorageMetadata]:
    """Every tensor's DCP key ('model.<name>', 'optim.state.<name>.exp_avg', ...), global shape and dtype."""
    return _tensors(SafeReader(path))


def iter_tensors(path: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole tensors by DCP key, one at a time: memory holds one tensor, whatever the model's size."""
    reader = SafeReader(path)
    tensors = _tensors(reader)
    for key in keys:
        meta = tensors[key]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        safe_dcp_load({key: tensor}, reader, no_dist=True)
        yield key, tensor
