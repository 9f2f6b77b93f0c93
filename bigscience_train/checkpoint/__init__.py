"""Sharded checkpoints with torch.distributed.checkpoint, committed atomically."""

from bigscience_train.checkpoint.dcp import CheckpointManager, TrainState

__all__ = ["CheckpointManager", "TrainState"]
