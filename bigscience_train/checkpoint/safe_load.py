"""A DCP load planner that never runs code from a checkpoint.

DCP's default load planner unpickles the items that are not tensors (the optimizer's per-parameter settings,
anything else in a state dict) with torch.load's unrestricted unpickler, which runs whatever code a file
carries. A checkpoint is a file anyone may hand over: ours unpickles them with weights_only=True.
"""

from __future__ import annotations

import io

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.planner import ReadItem


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
