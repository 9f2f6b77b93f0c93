"""Where metrics go: one JSON line per log interval, TensorBoard, and the terminal.

TensorBoard gets each metric twice, against the step and against consumed tokens, as BigScience logged
them, so runs with different batch sizes compare on one axis.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

_TOKEN_AXIS_KEYS = ("loss", "val_loss", "val_ppl", "lr", "batch_size", "grad_norm")


def _format(key: str, value) -> str:
    if isinstance(value, float):
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class MetricsWriter:
    """Only the rank that logs creates one; others get None from `open_writer`."""

    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, progress: str):
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        use_bar = progress == "bar" or (progress == "auto" and sys.stdout.isatty())
        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True) if use_bar else None

    def log(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step, tokens = record["step"], record.get("consumed_tokens")
        if self.tb is not None:
            for key, value in record.items():
                if key in ("step", "kind") or not isinstance(value, (int, float)):
                    continue
                self.tb.add_scalar(f"{record['kind']}/{key}", value, step)
                if tokens is not None and key in _TOKEN_AXIS_KEYS:
                    self.tb.add_scalar(f"{record['kind']}-vs-tokens/{key}", value, tokens)
        line = " | ".join(_format(k, v) for k, v in record.items() if k != "kind")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(line, refresh=True)
            if record["kind"] != "train":
                self.bar.write(f"[{record['kind']}] {line}")
        else:
            print(f"[{record['kind']}] {line}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()
