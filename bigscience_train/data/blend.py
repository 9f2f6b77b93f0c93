"""Megatron's blend syntax for data.blend, parsed without reading any file."""

from __future__ import annotations


def parse_blend(blend: list[str], name: str = "data.blend") -> tuple[list[str], list[float] | None]:
    """[prefix] or [weight, prefix, weight, prefix, ...] as (prefixes, weights or None); errors name the field."""
    if len(blend) == 1:
        return [str(blend[0])], None
    if len(blend) % 2:
        raise ValueError(f"{name} has {len(blend)} entries; expected [prefix] or weight/prefix pairs")
    weights, prefixes = [], []
    for i in range(0, len(blend), 2):
        try:
            weights.append(float(blend[i]))
        except ValueError:
            raise ValueError(f"{name}[{i}]={blend[i]!r} is not a weight (a number)") from None
        prefixes.append(str(blend[i + 1]))
    return prefixes, weights
