"""Sizes and checksums of a checkpoint's files, recorded in meta.json at save and checked before a load.

Checksums are xxh3-64 (several GB/s): each rank hashes every world-th file, so a checkpoint of thousands of
shards is hashed by the whole job, not by rank 0 alone. A file of the wrong size or checksum is an error that
names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import xxhash

from bigscience_train.checkpoint.file_reads import file_pieces


class CheckpointIntegrityError(ValueError):
    def __init__(self, directory: Path, found: list[str]):
        super().__init__(f"checkpoint {directory} is damaged:\n  " + "\n  ".join(found))


def new_digest():
    """The checksum meta.json records, to be fed a file's bytes in order."""
    return xxhash.xxh3_64()


def file_checksum(path: Path) -> str:
    digest = new_digest()
    for piece in file_pieces(path):
        digest.update(piece)
    return digest.hexdigest()


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


def problems(
    directory: Path,
    rank: int = 0,
    world: int = 1,
    hash_files: bool = True,
    hashed: dict[str, str] | None = None,
) -> list[str]:
    """What is wrong with the files meta.json lists: every size here, and (hash_files) their checksums: those
    in `hashed` (computed while the files were read) as they are, this rank's share of the others from disk."""
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text())
    found = []
    for name, size in meta.get("shards", {}).items():
        path = directory / name
        if not path.is_file():
            found.append(f"{path}: missing (meta.json lists it)")
        elif path.stat().st_size != size:
            found.append(f"{path}: {path.stat().st_size:,} bytes, meta.json records {size:,}")
    recorded = meta.get("checksums", {}) if hash_files else {}
    hashed = hashed or {}
    unhashed = [n for n in recorded if n not in hashed and (directory / n).is_file()]
    actual = {**checksums(directory, share(unhashed, rank, world)), **hashed}
    for name in sorted(actual.keys() & recorded.keys()):
        if actual[name] != recorded[name]:
            found.append(f"{directory / name}: checksum {actual[name]}, meta.json records {recorded[name]}")
    return found
