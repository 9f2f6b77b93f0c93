"""Sharded checkpoints with torch.distributed.checkpoint, committed atomically (dcp.py); where they are
(paths.py, no torch); integrity, inspection, Hugging Face export and import."""
