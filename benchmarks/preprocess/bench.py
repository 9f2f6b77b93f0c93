"""Preprocessing end to end: `bigscience data preprocess` against BigScience's own Megatron-DeepSpeed
`tools/preprocess_data.py`, each run as a user runs it (a fresh process, start-up included).

Corpus: the Python standard library (tests included) split into paragraph-sized documents, ~32 MB of text as
plain JSONL (the peer reads nothing else). Tokenizer: a byte-level BPE of GPT-2's size trained on part of the
corpus, given to ours as its tokenizer.json and to the peer as the same vocabulary in GPT-2's files
(`--tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt`). Both: 2 workers,
--append-eod; their .bin/.idx must be identical byte for byte. Runs alternate between the two (median of
--rounds); each one's start-up is measured as the same command on a one-document corpus, and reported with
the time left once it is taken off.

The peer's checkout comes from MEGATRON_DEEPSPEED (its interpreter from MEGATRON_DEEPSPEED_PYTHON, else this
one); without it the peer is reported as skipped (see PEER_HOWTO).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from benchmarks.common import report, write_result
from bigscience_train.data.indexed import open_indexed
from data_tools.tokenizer_train import train_tokenizer

DOC_CHARS = 3500
PEER_HOWTO = (
    "set MEGATRON_DEEPSPEED to a checkout of bigscience-workshop/Megatron-DeepSpeed (GitHub); its preprocessing "
    "imports torch, deepspeed, transformers, nltk and regex: pip install deepspeed nltk regex "
    "--no-build-isolation -c constraints/cpu.txt (or point MEGATRON_DEEPSPEED_PYTHON at an interpreter that has them)"
)
# The peer's dtype table names numpy.float, an alias of float that NumPy 1.24 removed: restored, nothing else.
PEER_LAUNCHER = (
    "import runpy, sys, numpy; numpy.float = float; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def paragraph_documents() -> list[str]:
    """Blank-line paragraphs of every stdlib .py file, grouped into documents of about DOC_CHARS."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        current = ""
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            current += para + "\n\n"
            if len(current) >= DOC_CHARS:
                docs.append(current)
                current = ""
        if current.strip():
            docs.append(current)
    return docs


def write_jsonl(docs: list[str], path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    return path


def gpt2_files(tokenizer_json: Path, folder: Path) -> tuple[str, str]:
    """The tokenizer's vocabulary and merges as GPT-2's vocab.json and merges.txt."""
    from tokenizers import Tokenizer

    folder.mkdir()
    vocab, merges = Tokenizer.from_file(str(tokenizer_json)).model.save(str(folder))
    return vocab, merges


def ours_command(corpus: Path, tokenizer: Path, prefix: str, workers: int) -> tuple[list[str], str]:
    """The installed `bigscience` entry point, and the prefix its outputs get."""
    bigscience = str(Path(sys.executable).with_name("bigscience"))
    return [
        bigscience,
        "data",
        "preprocess",
        "--input",
        str(corpus),
        "--output-prefix",
        prefix,
        "--tokenizer",
        str(tokenizer),
        "--append-eod",
        "--workers",
        str(workers),
    ], prefix


def peer_command(
    checkout: Path, python: str, corpus: Path, vocab: str, merges: str, prefix: str, workers: int
) -> tuple[list[str], str]:
    """Megatron-DeepSpeed's tools/preprocess_data.py, and the prefix its outputs get (it appends the key)."""
    return [
        python,
        "-c",
        PEER_LAUNCHER,
        str(checkout / "tools" / "preprocess_data.py"),
        "--input",
        str(corpus),
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        vocab,
        "--merge-file",
        merges,
        "--append-eod",
        "--workers",
        str(workers),
    ], f"{prefix}_text_document"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def identical(a: str, b: str) -> bool:
    return all(Path(a + s).read_bytes() == Path(b + s).read_bytes() for s in (".bin", ".idx"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each, in turns; the median is reported"
    )
    args = parser.parse_args()
    checkout = os.environ.get("MEGATRON_DEEPSPEED")
    if checkout and not (Path(checkout) / "tools" / "preprocess_data.py").is_file():
        sys.exit(f"MEGATRON_DEEPSPEED={checkout} has no tools/preprocess_data.py")
    peer_python = os.environ.get("MEGATRON_DEEPSPEED_PYTHON", sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        docs = paragraph_documents()
        corpus, tiny = write_jsonl(docs, d / "corpus.jsonl"), write_jsonl(docs[:1], d / "tiny.jsonl")
        tokenizer = d / "tokenizer.json"
        train_sample = write_jsonl(docs[:3000], d / "train.jsonl")
        train_tokenizer([str(train_sample)], tokenizer, args.vocab_size, show_progress=False)
        vocab, merges = gpt2_files(tokenizer, d / "gpt2")
        mb = sum(len(t.encode()) for t in docs) / 1e6
        print(f"corpus: {len(docs):,} documents, {mb:.1f} MB of text")

        runs = {"ours": ours_command(corpus, tokenizer, str(d / "ours"), args.workers)}
        startups = {"ours": ours_command(tiny, tokenizer, str(d / "ours_tiny"), args.workers)}
        if checkout:
            runs["peer"] = peer_command(
                Path(checkout), peer_python, corpus, vocab, merges, str(d / "peer"), args.workers
            )
            startups["peer"] = peer_command(
                Path(checkout), peer_python, tiny, vocab, merges, str(d / "peer_tiny"), args.workers
            )
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        startup: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name in runs:
                seconds[name].append(timed(runs[name][0]))
                startup[name].append(timed(startups[name][0]))
        tokens = open_indexed(runs["ours"][1]).num_tokens
        same = identical(runs["ours"][1], runs["peer"][1]) if checkout else None

    figures: dict = {"documents": len(docs), "megabytes": mb, "tokens": tokens, "workers": args.workers}
    for name in runs:
        total, start = median(seconds[name]), median(startup[name])
        figures[f"{name}_seconds"] = total
        figures[f"{name}_startup_seconds"] = start
        figures[f"{name}_seconds_without_startup"] = total - start
        figures[f"{name}_tokens_per_s"] = tokens / total
    if not checkout:
        print(f"peer skipped: {PEER_HOWTO}")
        for key, value in figures.items():
            print(f"{key:34s} {value:,.2f}" if isinstance(value, float) else f"{key:34s} {value}")
        write_result(
            "preprocess", {"figures": figures, "ratios": {}, "skipped": "MEGATRON_DEEPSPEED not set"}
        )
        return
    figures["identical_output"] = same
    figures["speedup_without_startup"] = (
        figures["peer_seconds_without_startup"] / figures["ours_seconds_without_startup"]
    )
    ratios = {
        "Megatron-DeepSpeed / ours, end to end": {
            "value": figures["peer_seconds"] / figures["ours_seconds"],
            "target": 4.0,
        },
        "identical output (1 = yes)": {"value": float(same), "target": 1.0},
    }
    report("preprocess", figures, ratios)


if __name__ == "__main__":
    main()
