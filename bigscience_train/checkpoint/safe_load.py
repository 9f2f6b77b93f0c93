"""Loading a DCP checkpoint without running code from it.

A checkpoint is a file anyone may hand over, and stock DCP unpickles two things from it with Python's
unrestricted unpickler, which runs whatever code a file carries: the `.metadata` file (FileSystemReader's
read_metadata) and the items that are not tensors (DefaultLoadPlanner's load_bytes: the optimizer's
per-parameter settings, anything else in a state dict). Ours unpickle the metadata with only DCP's own
metadata classes, and the items with torch.load(weights_only=True). The tensors need nothing of ours: stock
FileSystemReader.read_data already loads them with torch.load(weights_only=True). A file that needs any other
global is refused with an UnsafeCheckpointError that names the file and the global.

Megatron-DeepSpeed's files (layer, mp_rank, ZeRO and universal checkpoint files) are read by load_megds_file:
torch.load(weights_only=True) with an explicit allow-list of the classes Megatron-DeepSpeed and DeepSpeed
pickle besides tensors and containers: argparse.Namespace (Megatron's args), numpy's arrays and dtypes (the
RNG state, under numpy 1's and numpy 2's module names), DeepSpeed's ZeroStageEnum, loss scalers and
fragment_address, Megatron's enums. DeepSpeed's and Megatron's classes are read into stand-ins of ours with
the same fields and values, so reading never imports either project. A file that needs any other global is
refused with an UnsafeCheckpointError naming the file and the global.

One process loads and saves with DCP's no_dist, whose warning that torch.distributed is off is silenced here:
that is what we ask for.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import io
import pathlib
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.serialization import _get_layout

warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

METADATA_FILE = ".metadata"
# Modules whose own dataclasses and enums a .metadata file is made of.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PATHS = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
# How torch.load(weights_only=True) names the global it refused.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that needs a global outside the allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES:
            found = getattr(importlib.import_module(module), name, None)
            if (
                isinstance(found, type)
                and found.__module__ == module
                and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum))
            ):
                return found
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _get_layout
        if module == "pathlib" and name in _PATHS:
            return getattr(pathlib, name)
        raise UnsafeCheckpointError(f"{module}.{name}")


class SafeReader(FileSystemReader):
    """Stock FileSystemReader whose metadata is unpickled with the allow-list, read once per reader (one
    checkpoint directory): the loads of iter_model_tensors share it."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self) -> Metadata:
        if self._metadata is None:
            path = Path(self.path) / METADATA_FILE
            with open(path, "rb") as file:
                try:
                    metadata = _MetadataUnpickler(file).load()
                except UnsafeCheckpointError as error:
                    raise UnsafeCheckpointError(f"{path}: refused: it needs {error}") from None
            if not isinstance(metadata, Metadata):
                raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            self._metadata = metadata
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor items through torch.load(weights_only=True); `directory` names the refused file."""

    def __init__(self, directory: str | Path):
        super().__init__()
        self.directory = Path(directory)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            found = _REFUSED_GLOBAL.search(str(error))
            needs = found.group(1) if found else str(error)
            stored = self.metadata.storage_data[read_item.storage_index]
            raise UnsafeCheckpointError(
                f"{self.directory / stored.relative_path}: item {read_item.storage_index.fqn} refused: "
                f"it needs {needs}"
            ) from None
        fqn = read_item.dest_index.fqn
        if not self.flatten_state_dict:
            self.state_dict[fqn] = loaded
            return
        *parents, last = self.mappings[fqn]
        container = self.original_state_dict
        for key in parents:
            container = container[key]
        container[last] = loaded


def safe_dcp_load(state_dict: dict, reader: SafeReader, no_dist: bool) -> None:
    """dcp.load of `state_dict` in place. The metadata is read before DCP starts and a refused item is raised
    as itself, not inside DCP's CheckpointException: every rank raises the same error."""
    reader.read_metadata()
    try:
        dcp.load(state_dict, storage_reader=reader, planner=SafeLoadPlanner(reader.path), no_dist=no_dist)
    except CheckpointException as error:
        for failure, _ in error.failures.values():
            if isinstance(failure, UnsafeCheckpointError):
                raise failure from None
        raise


class ZeroStageEnum(int, enum.Enum):
    """deepspeed.runtime.zero.config.ZeroStageEnum."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


@dataclasses.dataclass
class FragmentAddress:
    """deepspeed.utils.tensor_fragment.fragment_address: where a parameter lies in a flat ZeRO partition."""

    numel: int
    start: int


class LossScalerState:
    """DeepSpeed's LossScaler and DynamicLossScaler: their fields (cur_scale, cur_iter, last_overflow_iter,
    scale_window, min_scale, delayed_shift, cur_hysteresis, dynamic, ...) as attributes."""

    def __repr__(self) -> str:
        return f"LossScalerState({vars(self)})"


def _megatron_enum(name: str, members: tuple[str, ...]) -> type[enum.Enum]:
    return enum.Enum(name, {member: value for value, member in enumerate(members, start=1)}, module=__name__)


# Megatron-DeepSpeed's enums (megatron/enums.py in BigScience's fork, megatron/model/enums.py in Microsoft's),
# with their values.
MEGATRON_ENUMS = {
    "LayerType": _megatron_enum("LayerType", ("encoder", "decoder")),
    "AttnType": _megatron_enum("AttnType", ("self_attn", "cross_attn")),
    "AttnMaskType": _megatron_enum("AttnMaskType", ("padding", "causal", "prefix", "custom")),
    "PositionEmbeddingType": _megatron_enum("PositionEmbeddingType", ("rotary", "absolute", "alibi")),
}


def _numpy_globals() -> list[tuple[object, str]]:
    reconstruct, scalar = np.ndarray.__reduce__(np.zeros(0))[0], np.float64(0).__reduce__()[0]
    names = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    # numpy >= 1.25 pickles a dtype as its own class (numpy.dtypes.Float64DType ...).
    for code in "?bBhHiIlLqQefdgFDGUS":
        dtype_class = type(np.dtype(code))
        names.append((dtype_class, f"numpy.dtypes.{dtype_class.__name__}"))
    return names


MEGDS_SAFE_GLOBALS = [
    argparse.Namespace,
    *_numpy_globals(),
    (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    *(
        (cls, f"{module}.{name}")
        for module in ("megatron.enums", "megatron.model.enums")
        for name, cls in MEGATRON_ENUMS.items()
    ),
]


def load_megds_file(path: str | Path, mmap: bool = True):
    """One Megatron-DeepSpeed or DeepSpeed .pt file, on the CPU, tensors memory-mapped (mmap) where the file
    is in torch's zip format: a tensor is read from disk when used."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(MEGDS_SAFE_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as error:
                if not mmap or "zipfile" not in str(error):
                    raise
                # The legacy (pre-zip) format cannot be memory-mapped.
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _REFUSED_GLOBAL.search(str(error))
        needs = found.group(1) if found else str(error).splitlines()[0]
        raise UnsafeCheckpointError(f"{path}: refused: it needs {needs}") from None
