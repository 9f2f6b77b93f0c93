"""What converting a Megatron-DeepSpeed launch gives: the overrides, the arguments left unmapped and why, and
how both are written out (Hydra override lines with # comments, or JSON)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

UNKNOWN, NO_EQUIVALENT, IGNORED = "unknown to us", "no equivalent", "ignored on purpose"
DEFAULT = "Megatron-DeepSpeed default"
# A Hydra override value written without quotes: nothing its grammar reads as syntax.
PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./@:+-]+")


@dataclass
class Override:
    key: str
    value: object
    # The argument, directive or DeepSpeed setting it comes from, or DEFAULT.
    source: str
    # The arithmetic behind a derived value, or why a choice was made.
    how: str | None = None

    @property
    def text(self) -> str:
        return f"{self.key}={hydra_value(self.value)}"


@dataclass
class Unmapped:
    argument: str
    value: str
    kind: str
    reason: str
    line: int | None
    # megatron, deepspeed, sbatch or launcher.
    origin: str


@dataclass
class Conversion:
    source: Path
    launch_line: int
    ds_config_source: str | None
    cluster_preset: str | None
    overrides: list[Override] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        """The Hydra overrides, as `bigscience train` and `bigscience plan` take them."""
        return [o.text for o in self.overrides]


def hydra_value(value) -> str:
    """A value as a Hydra override writes it (strings quoted where its grammar would read them otherwise)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    # ${NAME} would be an OmegaConf interpolation: a shell variable left unresolved is written $NAME.
    text = re.sub(r"\$\{(\w+)\}", r"$\1", str(value))
    if PLAIN_VALUE.fullmatch(text) and not reads_as_other_type(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def reads_as_other_type(text: str) -> bool:
    if text.lower() in ("true", "false", "null"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def to_json(conversion: Conversion, world: int, problems: list[str]) -> dict:
    return {
        "source": str(conversion.source),
        "launch_line": conversion.launch_line,
        "deepspeed_config": conversion.ds_config_source,
        "cluster_preset": conversion.cluster_preset,
        "overrides": [{"override": o.text, **asdict(o)} for o in conversion.overrides],
        "unmapped": [asdict(u) for u in conversion.unmapped],
        "notes": conversion.notes,
        "check": {"world_size": world, "problems": problems},
    }


def format_conversion(conversion: Conversion, world: int, problems: list[str]) -> str:
    """The overrides one per line, then derived values, unmapped arguments, notes and the config check as
    # comments (so `grep -v '^#'` leaves the overrides)."""
    where = f"launch at line {conversion.launch_line}"
    if conversion.ds_config_source:
        where += f"; DeepSpeed config from {conversion.ds_config_source}"
    out = [
        f"# bigscience overrides from {conversion.source} ({where})",
        "# one Hydra override per line: grep -v '^#' FILE | xargs -d '\\n' bigscience plan",
    ]
    out += [o.text for o in conversion.overrides if o.source != DEFAULT]
    defaults = [o.text for o in conversion.overrides if o.source == DEFAULT]
    if defaults:
        out += ["# left to Megatron-DeepSpeed's defaults by the launch (ours differ or may):", *defaults]
    derived = [f"#   {o.text}: {o.how}" for o in conversion.overrides if o.how]
    if derived:
        out += ["#", "# how values were derived:", *derived]
    out += ["#", f"# not mapped ({len(conversion.unmapped)}):"]
    for u in conversion.unmapped:
        value = f" {u.value}" if u.value else ""
        where = f" (line {u.line})" if u.line else " (DeepSpeed config)" if u.origin == "deepspeed" else ""
        out.append(f"#   {u.argument}{value}{where}: {u.kind}: {u.reason}")
    if conversion.notes:
        out += ["# notes:", *(f"#   {n}" for n in conversion.notes)]
    verdict = "no problems" if not problems else f"{len(problems)} problem{'s' * (len(problems) > 1)}"
    out.append(f"# config check at {world} ranks: {verdict}")
    out += [f"#   - {p}" for p in problems]
    return "\n".join(out) + "\n"
