"""Reading a committed checkpoint outside training: where it is, what it holds, one tensor at a time."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from bigscience_train.checkpoint.paths import latest_checkpoint
from bigscience_train.checkpoint.safe_load import SafeLoadPlanner
from bigscience_train.checkpoint.streaming_reader import StreamingReader

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


def model_tensors_metadata(path: Path) -> dict[str, TensorStorageMetadata]:
    """Model tensor names (HF Bloom names, without the 'model.' prefix) and their global shape and dtype."""
    metadata = StreamingReader(path).read_metadata()
    return {
        key[len(MODEL_PREFIX) :]: value
        for key, value in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(value, TensorStorageMetadata)
    }


def iter_model_tensors(path: Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) model tensors, one at a time: memory holds one tensor, whatever the model's size."""
    tensors = model_tensors_metadata(path)
    for name in names if names is not None else list(tensors):
        meta = tensors[name]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with single_process_dcp():
            dcp.load(
                {MODEL_PREFIX + name: tensor},
                storage_reader=StreamingReader(path),
                planner=SafeLoadPlanner(),
                no_dist=True,
            )
        yield name, tensor


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """DCP with no_dist=True warns that torch.distributed is off: that is what we ask for (one process reading or
    writing a whole checkpoint)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
