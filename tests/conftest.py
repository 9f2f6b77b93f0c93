"""Shared fixtures: a small real dataset (a slice of the standard library), built once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.corpus import documents, stdlib_sources, write_jsonl
from data_tools.preprocess import preprocess
from data_tools.tokenizer_train import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """JSONL corpus of 60 stdlib modules, a 512-token BPE tokenizer, and the .bin/.idx dataset."""
    d = tmp_path_factory.mktemp("tiny_data")
    files = stdlib_sources()[:60]
    corpus = d / "corpus.jsonl"
    write_jsonl(documents(files), corpus)
    tokenizer = d / "tokenizer.json"
    train_tokenizer([str(corpus)], tokenizer, vocab_size=512, show_progress=False)
    prefix = str(d / "tiny_text_document")
    preprocess([str(corpus)], prefix, str(tokenizer), progress=False)
    return {"dir": d, "corpus": corpus, "tokenizer": str(tokenizer), "prefix": prefix}


def data_overrides(tiny_data: dict, run_dir: Path) -> list[str]:
    return [
        f"data.blend=[{tiny_data['prefix']}]",
        f"data.tokenizer={tiny_data['tokenizer']}",
        f"data.cache_dir={tiny_data['dir'] / 'cache'}",
        "data.split='90,9,1'",
        f"run_dir={run_dir}",
        "logging.tensorboard=false",
        "logging.progress=plain",
        # codecarbon's hardware probe costs seconds per run: on only where a test looks at carbon.
        "logging.carbon=false",
    ]


def torchrun(nproc: int, target: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *target,
    ]


def run_cli(
    args: list[str], nproc: int = 1, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`bigscience ...` in a fresh process, under torchrun when nproc > 1, as a user would run it."""
    if nproc > 1:
        module = {"train": "bigscience_train.train", "eval": "evaluation"}[args[0]]
        cmd = torchrun(nproc, ["-m", module, *args[1:]])
    else:
        cmd = [sys.executable, "-m", "bigscience_train.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(env), capture_output=True, text=True, timeout=timeout)


def run_script(
    script: str, nproc: int, args: list[str], env: dict | None = None
) -> subprocess.CompletedProcess:
    """tests/SCRIPT under torchrun: a check that needs the trainer's objects after the run."""
    cmd = torchrun(nproc, [str(ROOT / "tests" / script), *args])
    return subprocess.run(cmd, cwd=ROOT, env=child_env(env), capture_output=True, text=True, timeout=600)


def child_env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", **(extra or {})}


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
