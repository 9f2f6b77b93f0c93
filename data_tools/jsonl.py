"""Streaming reader of JSONL corpora (.jsonl, .jsonl.gz, .jsonl.zst) that counts what it skips and why."""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SKIP_REASONS = ("invalid_utf8", "malformed_json", "missing_key", "non_string", "empty")
_SHOWN_POSITIONS = 5


class CorpusError(ValueError):
    """A bad line under --strict, or an input that cannot be read."""


@dataclass
class SkipLog:
    counts: Counter = field(default_factory=Counter)
    positions: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        shown = self.positions.setdefault(reason, [])
        if len(shown) < _SHOWN_POSITIONS:
            shown.append(where)

    def summary(self) -> str:
        if not self.counts:
            return "skipped: none"
        parts = [
            f"{r}={self.counts[r]} (first at {', '.join(self.positions[r])})"
            for r in SKIP_REASONS
            if self.counts[r]
        ]
        return "skipped: " + "; ".join(parts)


def expand_inputs(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise CorpusError(f"input {pattern!r} matches no file")
        for match in matches:
            if not Path(match).is_file():
                raise CorpusError(f"input {match} does not exist")
            files.append(Path(match))
    return files


def open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise CorpusError(
                f"{path}: reading .zst needs the zstandard package (pip install zstandard)"
            ) from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def count_lines(files: list[Path]) -> int:
    total = 0
    for path in files:
        with open_binary(path) as f:
            total += sum(1 for _ in f)
    return total


def shard_range(total_lines: int, shard: int, num_shards: int) -> range:
    """Contiguous global line numbers of shard `shard` of `num_shards`; in shard order they make the whole."""
    if not 0 <= shard < num_shards:
        raise CorpusError(f"shard {shard} is not in 0..{num_shards - 1}")
    return range(total_lines * shard // num_shards, total_lines * (shard + 1) // num_shards)


def read_texts(
    files: list[Path], key: str, skips: SkipLog, strict: bool, lines: range | None = None
) -> Iterator[str]:
    """Yields the text of each good line in order; bad lines are counted in `skips` (errors under strict).
    `lines`: only these global (0-based, across all files) line numbers."""
    index = -1
    for path in files:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                index += 1
                if lines is not None and index not in lines:
                    if index >= lines.stop:
                        return
                    continue
                reason, text = _parse_line(raw, key)
                if reason is None:
                    yield text
                    continue
                where = f"{path}:{lineno}"
                if strict:
                    raise CorpusError(f"{where}: {reason.replace('_', ' ')} (key {key!r})")
                skips.add(reason, where)


def _parse_line(raw: bytes, key: str) -> tuple[str | None, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8", ""
    if not line.strip():
        return "empty", ""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return "malformed_json", ""
    if not isinstance(obj, dict) or key not in obj:
        return "missing_key", ""
    text = obj[key]
    if not isinstance(text, str):
        return "non_string", ""
    if not text.strip():
        return "empty", ""
    return None, text
