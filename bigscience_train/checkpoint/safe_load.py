"""Loading a DCP checkpoint without running code from it.

A checkpoint is a file anyone may hand over, and DCP unpickles two things from it with Python's unrestricted
unpickler, which runs whatever code a file carries: the `.metadata` file, and the items that are not tensors
(the optimizer's per-parameter settings, anything else in a state dict). Ours unpickle the metadata with only
DCP's own metadata classes, and the items with only plain values and tensors (`saved_object`, which leaves
anything else to torch.load's weights_only=True).
"""

from __future__ import annotations

import importlib
import io
import pathlib
import pickle
from typing import BinaryIO

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.serialization import _get_layout

from bigscience_train.checkpoint.saved_object import saved_object

# Modules whose own classes a .metadata file is made of (plain dataclasses and enums).
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PATHS = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES:
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and found.__module__ == module:
                return found
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _get_layout
        if module == "pathlib" and name in _PATHS:
            return getattr(pathlib, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}: not a part of DCP metadata")


def load_metadata(file: BinaryIO) -> Metadata:
    metadata = _MetadataUnpickler(file).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = saved_object(torch.frombuffer(value.getbuffer(), dtype=torch.uint8))
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
