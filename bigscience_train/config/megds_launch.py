"""Reads a Megatron-DeepSpeed launch without running it: a plain argument list, or a bash/Slurm script.

From a script (followed by megds_shell as bash would run it): the arguments pretrain_*.py receives, the torch
launcher's options before it, the #SBATCH directives, and the DeepSpeed JSON config, written by a
here-document (`cat <<EOT > $config_json`) or a file next to the script.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from bigscience_train.config.megds_shell import Command, HereDoc, ShellError, ShellReader

ENTRY_POINT = re.compile(r"(^|/)pretrain_\w+\.py$")
# Programs whose options before pretrain_*.py say the job's size (torchrun's, deepspeed's).
LAUNCHERS = ("torch.distributed.launch", "torch.distributed.run", "torchrun", "deepspeed")
DS_CONFIG_OPTIONS = ("--deepspeed_config", "--deepspeed-config", "--deepscale_config")
SBATCH_SHORT = {
    "-N": "nodes",
    "-n": "ntasks",
    "-c": "cpus-per-task",
    "-t": "time",
    "-A": "account",
    "-p": "partition",
    "-C": "constraint",
    "-J": "job-name",
    "-o": "output",
    "-e": "error",
    "-G": "gpus",
    "-q": "qos",
    "-x": "exclude",
    "-a": "array",
    "-d": "dependency",
}


class LaunchError(ShellError):
    """A launch file that cannot be read; the message names the file and line."""


@dataclass
class Arg:
    """One --argument of the launch, its values (none for a flag), and the file line it is written on."""

    name: str
    values: list[str]
    line: int

    @property
    def key(self) -> str:
        """The name as argparse reads it: `--deepspeed_config` and `--deepspeed-config` are one option."""
        return self.name.replace("_", "-")

    @property
    def text(self) -> str:
        return " ".join(self.values)


@dataclass
class Directive:
    """An #SBATCH option by its long name (`nodes`, not `-N`)."""

    name: str
    value: str | None
    line: int


@dataclass
class Launch:
    path: Path
    args: list[Arg]
    # The torch launcher's (or deepspeed launcher's) options; empty for any other program.
    launcher: list[Arg]
    line: int
    sbatch: list[Directive]
    ds_config: dict | None
    # Where the DeepSpeed config was read from, or why it was not.
    ds_config_source: str | None
    ds_config_problem: str | None
    unresolved: list[str]


def sbatch_directives(path: Path, lines: list[str]) -> list[Directive]:
    """#SBATCH lines before the first command (where sbatch stops reading them)."""
    found = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if not stripped.startswith("#SBATCH"):
            continue
        try:
            words = shlex.split(stripped[len("#SBATCH") :], comments=True)
        except ValueError as e:
            raise LaunchError(f"{path}:{number}: #SBATCH line does not parse: {e}") from e
        i = 0
        while i < len(words):
            word, value = words[i], None
            if word.startswith("--"):
                name, eq, value = word[2:].partition("=")
                if not eq:
                    value = None
                    if i + 1 < len(words) and not words[i + 1].startswith("-"):
                        value, i = words[i + 1], i + 1
            elif word[:2] in SBATCH_SHORT:
                name, value = SBATCH_SHORT[word[:2]], word[2:] or None
                if value is None and i + 1 < len(words):
                    value, i = words[i + 1], i + 1
            else:
                raise LaunchError(f"{path}:{number}: #SBATCH {word!r} is not an option")
            found.append(Directive(name, value, number))
            i += 1
    return found


def option_line(lines: list[str], name: str, default: int) -> int:
    """The last uncommented line that writes this option, where a reader of the file would look for it."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
    found = [
        n for n, line in enumerate(lines, 1) if not line.lstrip().startswith("#") and pattern.search(line)
    ]
    return found[-1] if found else default


def parse_args(path: Path, words: list[str], lines: list[str], line: int) -> list[Arg]:
    args: list[Arg] = []
    for word in words:
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            args.append(Arg(name, [value] if eq else [], option_line(lines, name, line)))
        elif not args:
            raise LaunchError(f"{path}:{line}: {word!r} comes before any --argument")
        else:
            args[-1].values.append(word)
    return args


def read_ds_config(path: Path, args: list[Arg], heredocs: dict[str, HereDoc]):
    """(config, where it came from, why it was not read) for the launch's --deepspeed_config."""
    option = next((a for a in reversed(args) if a.name in DS_CONFIG_OPTIONS), None)
    if option is None:
        return None, None, None
    given = option.text
    doc = heredocs.get(given)
    if doc is not None:
        return parse_json(doc.body or "", path, doc.line + 1), f"the here-document at line {doc.line}", None
    found = file_beside(path, given)
    if found is not None:
        return parse_json(found.read_text(), found, 1), str(found), None
    return (
        None,
        None,
        f"{option.name} {given}: no here-document writes it and no such file next to {path.name}",
    )


def file_beside(path: Path, given: str) -> Path | None:
    """A file the launch at `path` names: as given (relative to the launch), or by its name next to the launch
    (its directory on the cluster, set by variables defined elsewhere, is not this machine's)."""
    candidates = [Path(given)] if Path(given).is_absolute() else [path.parent / given]
    candidates.append(path.parent / Path(given).name)
    return next((c for c in candidates if "$" not in str(c) and c.is_file()), None)


def parse_json(text: str, path: Path, first_line: int) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise LaunchError(
            f"{path}:{first_line + e.lineno - 1}: the DeepSpeed config is not JSON: {e.msg}"
        ) from e
    if not isinstance(config, dict):
        raise LaunchError(f"{path}:{first_line}: the DeepSpeed config is not a JSON object")
    return config


def launch_words(path: Path, reader: ShellReader) -> tuple[list[str], list[str], int]:
    """(launcher words, pretrain_*.py's arguments, line) of the last command running pretrain_*.py; else of
    the last variable holding one (a launch the reader cannot follow); else the lines of --arguments."""
    runs = [
        c
        for c in reader.commands
        if c.fields[0] not in ("echo", "printf") and any(map(ENTRY_POINT.search, c.fields))
    ]
    if not runs:
        held = [a for a in reader.assignments if re.search(r"pretrain_\w+\.py", a.value)]
        if held:
            runs = [Command(reader.words(held[-1].value, held[-1].line), held[-1].line)]
    if runs:
        fields = runs[-1].fields
        entry = next(i for i, w in enumerate(fields) if ENTRY_POINT.search(w))
        return fields[:entry], fields[entry + 1 :], runs[-1].line
    listed = [c for c in reader.commands if c.fields[0].startswith("--")]
    if not listed:
        raise LaunchError(
            f"{path}: no Megatron-DeepSpeed launch found: no pretrain_*.py command and no line of --arguments"
        )
    return [], [w for c in listed for w in c.fields], listed[0].line


def read_launch(path: str | Path) -> Launch:
    """The launch a file describes: a script running pretrain_*.py, or lines of --arguments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such launch file {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise LaunchError(f"{path}: not a text file ({e.reason} at byte {e.start})") from e
    lines = text.splitlines()
    reader = ShellReader(text, path, {}).run()
    launcher, words, line = launch_words(path, reader)
    args = parse_args(path, words, lines, line)
    start = next((i for i, w in enumerate(launcher) if w.startswith("--")), len(launcher))
    known = any(Path(w).name in LAUNCHERS for w in launcher[:start])
    ds_config, ds_source, ds_problem = read_ds_config(path, args, reader.heredocs)
    return Launch(
        path,
        args,
        parse_args(path, launcher[start:], lines, line) if known else [],
        line,
        sbatch_directives(path, lines),
        ds_config,
        ds_source,
        ds_problem,
        sorted(reader.unresolved),
    )
