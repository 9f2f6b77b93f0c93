"""JSONL corpora: the demo corpus (the Python standard library's sources) or a folder of text files."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from bigscience_train.fsutil import atomic_path

# Tests are mostly generated fixtures and data, not the prose-and-code the demo wants to learn from.
_SKIPPED_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def stdlib_sources() -> list[Path]:
    """The standard library's .py files, in a fixed order, every machine has them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_files(folder: Path, pattern: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus folder {folder} does not exist")
    return sorted(p for p in folder.rglob(pattern) if p.is_file())


def documents(files: Iterable[Path], root: Path | None = None) -> Iterator[dict]:
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield {"text": text, "source": (path.relative_to(root) if root else path).as_posix()}


def write_jsonl(docs: Iterable[dict], output: Path) -> int:
    count = 0
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_corpus(output: Path, folder: Path | None = None, pattern: str = "*.txt") -> int:
    """Writes the stdlib corpus, or one document per file of `folder`; returns the number of documents."""
    if folder is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        return write_jsonl(documents(stdlib_sources(), root), output)
    return write_jsonl(documents(text_files(folder, pattern), folder), output)
