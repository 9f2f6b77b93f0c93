"""Start-up of the commands that only read configs and small files, as a user runs them: the wall time of the
installed `bigscience` entry point in a fresh process, from its start to its exit.

Peers: `python -c "import torch"` (the cost these commands must not pay) and `python -c pass` (the
interpreter alone). Target: each command under 1.5 s. Every command is run once untimed (bytecode and page
cache), then --rounds times in turns with the others; the median is reported. One more run of each, with
PYTHONPROFILEIMPORTTIME, tells which of them import torch.

Inputs are made in a temporary directory: a small .bin/.idx dataset and its tokenizer (a slice of the
standard library), the run directory `slurm render` writes (then read by `slurm status`), and a run
directory for `report` holding a resolved config.yaml and a metrics.jsonl of 200 logged steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import report, time_interleaved
from bigscience_train.config import load_config, to_yaml
from data_tools.corpus import documents, stdlib_sources, write_jsonl
from data_tools.preprocess import preprocess
from data_tools.tokenizer_train import train_tokenizer

TARGET_S = 1.5
ROOT = Path(__file__).resolve().parents[2]


def small_dataset(d: Path) -> tuple[str, str]:
    corpus = d / "corpus.jsonl"
    write_jsonl(documents(stdlib_sources()[:40]), corpus)
    tokenizer = d / "tokenizer.json"
    train_tokenizer([str(corpus)], tokenizer, vocab_size=1024, show_progress=False)
    prefix = str(d / "small_text_document")
    preprocess([str(corpus)], prefix, str(tokenizer), progress=False)
    return prefix, str(tokenizer)


def metrics(steps: int = 200) -> str:
    """A run's metrics.jsonl as the trainer writes it: a train record per step, a validation one every 50."""
    lines = []
    for step in range(1, steps + 1):
        tokens = step * 8 * 512
        lines.append(
            {
                "kind": "train",
                "step": step,
                "consumed_tokens": tokens,
                "loss": 9.0 * math.exp(-step / 80) + 2.0,
                "lr": 3e-4 * min(1.0, step / 20),
                "batch_size": 8,
                "tokens_per_s": 1000.0 + step % 7,
                "mfu": 0.4,
                "grad_norm": 1.0 / math.sqrt(step),
                "skipped_steps": 0,
            }
        )
        if step % 50 == 0:
            loss = 9.0 * math.exp(-step / 80) + 2.1
            lines.append(
                {
                    "kind": "valid",
                    "step": step,
                    "consumed_tokens": tokens,
                    "val_loss": loss,
                    "val_ppl": math.exp(loss),
                }
            )
    return "".join(json.dumps(line) + "\n" for line in lines)


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)


def imports_torch(command: list[str]) -> bool:
    done = run(command, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    return any(line.rstrip().endswith("| torch") for line in done.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each command, taken in turns")
    args = parser.parse_args()
    bigscience = str(Path(sys.executable).with_name("bigscience"))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        prefix, tokenizer = small_dataset(d)
        data = [f"data.blend=[{prefix}]", f"data.tokenizer={tokenizer}"]
        report_run = d / "report_run"
        report_run.mkdir()
        (report_run / "config.yaml").write_text(to_yaml(load_config([*data, f"run_dir={report_run}"])))
        (report_run / "metrics.jsonl").write_text(metrics())
        # (arguments, exit codes that mean it worked): status exits 1 for a run neither running nor queued.
        commands: dict[str, tuple[list[str], tuple[int, ...]]] = {
            "train --cfg job": (["train", "--cfg", "job"], (0,)),
            "slurm render": (
                [
                    "slurm",
                    "render",
                    "experiment=demo",
                    "cluster=jean_zay_v100_32g",
                    # demo's batch ramp-up grows by 8 samples: micro batch 2 x 4 ranks divides it.
                    "train.micro_batch_size=2",
                    f"run_dir={d / 'render'}",
                    *data,
                ],
                (0,),
            ),
            "slurm status": (["slurm", "status", str(d / "render")], (0, 1)),
            "plan": (
                [
                    "plan",
                    "model=tr1_13b",
                    "parallel.tp=2",
                    "parallel.pp=4",
                    "cluster=jean_zay_v100_32g",
                    "cluster.nodes=128",
                    "train.global_batch_size=1024",
                ],
                (0,),
            ),
            "report": (["report", str(report_run)], (0,)),
            "data inspect": (["data", "inspect", prefix, "--tokenizer", tokenizer], (0,)),
        }
        full = {name: ([bigscience, *argv], ok) for name, (argv, ok) in commands.items()}
        full["peer: python -c 'import torch'"] = ([sys.executable, "-c", "import torch"], (0,))
        full["peer: python -c pass"] = ([sys.executable, "-c", "pass"], (0,))
        # The untimed first run of each, in this order (slurm status reads what slurm render writes): a command
        # that fails there is reported as failed and not timed.
        failed = {}
        for name, (command, ok) in full.items():
            done = run(command)
            if done.returncode not in ok:
                failed[name] = f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
                print(f"{name} failed ({failed[name]})", file=sys.stderr)
        timed = {
            name: (lambda c=command: run(c)) for name, (command, _) in full.items() if name not in failed
        }
        seconds = time_interleaved(timed, warmup=0, rounds=args.rounds)
        torch_imported = {name: imports_torch(full[name][0]) for name in commands if name not in failed}

    torch_s = seconds["peer: python -c 'import torch'"]
    figures: dict = {f"{name} seconds": s for name, s in seconds.items()}
    figures.update({f"{name} / import torch": seconds[name] / torch_s for name in torch_imported})
    figures.update({f"{name} imports torch": imported for name, imported in torch_imported.items()})
    figures.update({f"{name} failed": why for name, why in failed.items()})
    ratios = {
        f"{name}: {TARGET_S} s / its time": {
            "value": TARGET_S / seconds[name] if name in seconds else 0.0,
            "target": 1.0,
        }
        for name in commands
    }
    report("startup", figures, ratios)


if __name__ == "__main__":
    main()
