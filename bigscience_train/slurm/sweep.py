"""Hydra sweep syntax (`optim.lr=1e-4,3e-4 model=gpt_125m,gpt_350m`) expanded into the runs of an array."""

from __future__ import annotations

import itertools
import re

from hydra.core.override_parser.overrides_parser import OverridesParser


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination, in Hydra's order (the last swept key varies fastest); fixed overrides in each."""
    axes = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element()
        if override.is_sweep_override():
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([override.input_line])
    return [list(combo) for combo in itertools.product(*axes)]


def swept_keys(overrides: list[str]) -> list[str]:
    return [
        o.get_key_element()
        for o in OverridesParser.create().parse_overrides(list(overrides))
        if o.is_sweep_override()
    ]


def task_label(index: int, combo: list[str], keys: list[str]) -> str:
    """`03-lr=0.0003-model=gpt_350m`: the task index and its swept values, safe as a directory name."""
    parts = [o for o in combo if o.split("=", 1)[0] in keys]
    text = "-".join(p.split("=", 1)[0].split(".")[-1] + "=" + p.split("=", 1)[1] for p in parts)
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9._=+-]", "_", text)[:80]
