"""A run directory holding one checkpoint of ours (step_N/, `latest`, config.yaml), written from whole
tensors made one at a time: an import from another format. The save is planned from shapes alone (meta
tensors), and each tensor is made by its loader only when DCP's writer reaches it, so memory holds one tensor,
never the model. The directory appears under its final name only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from bigscience_train import __version__
from bigscience_train.checkpoint.dcp import TrainState
from bigscience_train.checkpoint.integrity import checksums, file_record
from bigscience_train.checkpoint.paths import LATEST, step_dir_name
from bigscience_train.config import to_yaml
from bigscience_train.fsutil import atomic_write_text, temporary_sibling

Loader = Callable[[], torch.Tensor]


class LazySavePlanner(DefaultSavePlanner):
    """Plans from meta tensors; makes each tensor with its loader when the writer reaches it."""

    def __init__(self, loaders: dict[str, Loader]):
        super().__init__()
        self.loaders = loaders

    def resolve_data(self, write_item):
        loader = self.loaders.get(write_item.index.fqn)
        return loader().contiguous() if loader is not None else super().resolve_data(write_item)


def write_run(
    out: Path,
    cfg,
    tensors: dict[str, tuple[torch.Tensor, Loader]],
    values: dict[str, object],
    state: TrainState,
    meta: dict,
    copies: dict[str, Path] | None = None,
) -> Path:
    """out/checkpoints/step_{state.step}/ from `tensors` (DCP key -> (meta tensor, loader)) and `values`
    (DCP key -> a non-tensor item), with `meta` added to meta.json; `copies` are files put into `out`."""
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output directory")
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    step = tmp / "checkpoints" / step_dir_name(state.step)
    step.mkdir(parents=True)
    try:
        start = time.perf_counter()
        dcp.save(
            {**{key: placeholder for key, (placeholder, _) in tensors.items()}, **values},
            storage_writer=FileSystemWriter(str(step), thread_count=1),
            planner=LazySavePlanner({key: loader for key, (_, loader) in tensors.items()}),
            no_dist=True,
        )
        for name, source in (copies or {}).items():
            shutil.copyfile(source, tmp / name)
        (step / "config.yaml").write_text(to_yaml(cfg))
        (step / "train_state.json").write_text(json.dumps(asdict(state), indent=2))
        names = [p.name for p in step.iterdir() if p.is_file()]
        record = {
            "version": __version__,
            "model": cfg.model.name,
            "layout": {"tp": 1, "pp": 1, "dp": 1},
            **meta,
            **asdict(state),
            **file_record(step, names, checksums(step, names)),
            "save_seconds": time.perf_counter() - start,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (step / "meta.json").write_text(json.dumps(record, indent=2))
        atomic_write_text(tmp / "config.yaml", to_yaml(cfg))
        atomic_write_text(tmp / "checkpoints" / LATEST, step.name + "\n")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
