"""Throughput, FLOPs and MFU; metrics writers (JSONL, TensorBoard, terminal)."""
