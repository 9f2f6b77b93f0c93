"""Writes the bundled tasks' data from the Python standard library's sources (the demo corpus): small,
deterministic, and readable. Run it only to change the tasks: the JSON files it writes are committed.

stdlib_cloze: a few lines of code, then a line without its last word; the target is that word (LAMBADA-style:
accuracy is whether greedy decoding gives the whole word, perplexity is over the word's tokens).
stdlib_choice: the same kind of context, four endings of the last line: its own and three taken from other
files (HellaSwag-style: acc and length-normalised acc_norm).

    python -m evaluation.tasks.make_data
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from data_tools.corpus import stdlib_sources

HERE = Path(__file__).resolve().parent
DOCS = 200
WORD = re.compile(r"^(.*\S)\s+([A-Za-z_][A-Za-z0-9_]{2,})$")


def candidate_lines(rng: random.Random) -> list[tuple[str, str, str]]:
    """(preceding lines, line without its last word, last word) from lines ending in an identifier."""
    found = []
    for path in rng.sample(stdlib_sources(), 400):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for i in range(3, len(lines)):
            match = WORD.match(lines[i])
            if match and len(lines[i]) < 100 and not lines[i].lstrip().startswith("#"):
                found.append(("\n".join(lines[i - 3 : i]), match.group(1), match.group(2)))
    rng.shuffle(found)
    return found


def write(name: str, docs: list[dict]) -> None:
    path = HERE / f"{name}.json"
    path.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs) + "\n")
    print(f"{path}: {len(docs)} documents")


def main() -> None:
    rng = random.Random(2022)
    lines = candidate_lines(rng)
    cloze = [{"context": f"{before}\n{start}", "target": f" {word}"} for before, start, word in lines[:DOCS]]
    write("stdlib_cloze", cloze)
    choice = []
    endings = [f" {word}" for _, _, word in lines[DOCS:]]
    for before, start, word in lines[DOCS : 2 * DOCS]:
        wrong = [e for e in rng.sample(endings, 6) if e != f" {word}"][:3]
        choices = [f" {word}", *wrong]
        rng.shuffle(choices)
        choice.append(
            {"context": f"{before}\n{start}", "choices": choices, "label": choices.index(f" {word}")}
        )
    write("stdlib_choice", choice)


if __name__ == "__main__":
    main()
