"""Sizes and checksums of a checkpoint's files, recorded in meta.json at save and checked at load.

Checksums are xxh3-64, each file read through one open in large reads. The work is shared out over the ranks:
at save each rank hashes the shard files it wrote (DCP names them `__<rank>_<n>.distcp`), where the bytes
are most likely still in its page cache, and every world-th of the others; at load every world-th file. A file
of the wrong size or checksum is an error that names it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import xxhash

READ_BYTES = 16 << 20
_SHARD_NAME = re.compile(r"__(\d+)_\d+\.distcp")


class CheckpointIntegrityError(ValueError):
    def __init__(self, directory: Path, found: list[str]):
        super().__init__(f"checkpoint {directory} is damaged:\n  " + "\n  ".join(found))


def file_checksum(path: Path) -> str:
    digest = xxhash.xxh3_64()
    buffer = memoryview(bytearray(READ_BYTES))
    with open(path, "rb", buffering=0) as file:
        while read := file.readinto(buffer):
            digest.update(buffer[:read])
    return digest.hexdigest()


def writer_rank(name: str) -> int | None:
    """The rank that wrote a file, where DCP's name for it tells."""
    found = _SHARD_NAME.fullmatch(name)
    return int(found.group(1)) if found else None


def share(names: list[str], rank: int, world: int) -> list[str]:
    return sorted(names)[rank::world]


def checksums(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: file_checksum(directory / name) for name in names}


def file_record(directory: Path, names: list[str], hashed: dict[str, str]) -> dict:
    """meta.json's `shards` (sizes) and `checksums` of these files of a checkpoint directory."""
    return {
        "shards": {name: (directory / name).stat().st_size for name in sorted(names)},
        "checksums": dict(sorted(hashed.items())),
    }


def problems(directory: Path, rank: int = 0, world: int = 1, hash_files: bool = True) -> list[str]:
    """What is wrong with the files meta.json lists: every size, and (hash_files) this rank's share of the
    checksums."""
    meta = json.loads((directory / "meta.json").read_text())
    found = []
    for name, size in meta.get("shards", {}).items():
        path = directory / name
        if not path.is_file():
            found.append(f"{path}: missing (meta.json lists it)")
        elif path.stat().st_size != size:
            found.append(f"{path}: {path.stat().st_size:,} bytes, meta.json records {size:,}")
    recorded = meta.get("checksums", {}) if hash_files else {}
    present = [name for name in recorded if (directory / name).is_file()]
    for name, actual in checksums(directory, share(present, rank, world)).items():
        if actual != recorded[name]:
            found.append(f"{directory / name}: checksum {actual}, meta.json records {recorded[name]}")
    return found
