"""Where metrics go: one JSON line per log interval, TensorBoard, and the terminal.

TensorBoard gets each metric twice, against the step and against consumed tokens, as BigScience logged
them, so runs with different batch sizes compare on one axis.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

from tqdm import tqdm

_TOKEN_AXIS_KEYS = (
    "loss",
    "val_loss",
    "val_ppl",
    "lr",
    "batch_size",
    "grad_norm",
    "energy_kwh",
    "emissions_kg",
)


def _format(key: str, value) -> str:
    if isinstance(value, float):
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class MetricsWriter:
    """Only the rank that logs creates one; others get None from `open_writer`."""

    def __init__(self, run_dir: Path, total_steps: int, logging_cfg, run_name: str, config: dict):
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tb = None
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = _start_wandb(run_dir, logging_cfg, run_name, config) if logging_cfg.wandb else None
        progress = logging_cfg.progress
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
                # val_loss/<name>: a named validation set's, plotted against tokens like val_loss.
                if tokens is not None and key.split("/")[0] in _TOKEN_AXIS_KEYS:
                    self.tb.add_scalar(f"{record['kind']}-vs-tokens/{key}", value, tokens)
        if self.wandb is not None:
            # Step and consumed tokens ride along with every point: either is an x-axis in the W&B UI.
            values = {f"{record['kind']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb.log({**values, "step": step, "consumed_tokens": tokens})
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
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()


def _start_wandb(run_dir: Path, logging_cfg, run_name: str, config: dict):
    """One W&B run per run directory, continued by every job of a chain (its id is kept in RUN/wandb_id)."""
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=logging_cfg.wandb_project,
        name=run_name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=logging_cfg.wandb_mode,
        config=config,
    )
