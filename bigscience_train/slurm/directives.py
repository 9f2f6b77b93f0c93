"""The #SBATCH header of a job from a cluster preset, and the checks its values must pass first.

Directive values are not read by a shell, but a newline would start a new line of the script: every value is
checked against what Slurm accepts for that option, and an error names the field.
"""

from __future__ import annotations

import re

from bigscience_train.config.validate import ConfigError

# Account, partition, qos, constraint, node lists, gres: names, commas, and Slurm's own operators.
_DIRECTIVE_VALUE = re.compile(r"^[A-Za-z0-9@._:,=+/&|\[\]*!()-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names that hold credentials: they reach the job through sbatch's environment, never through the script.
SECRET_NAME = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_seconds(value: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME.match(str(value).strip())
    if not m:
        raise ValueError(f"cluster.time={value!r} is not a Slurm time (e.g. 20:00:00, 100:00:00, 2-00:00:00)")
    days, a, b, c = m.groups()
    if days is not None:
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if c is not None:
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:
        return int(a) * 60 + int(b)
    return int(a) * 60


def job_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "job"


def cluster_problems(cluster) -> list[str]:
    """Every problem of a cluster preset that would make a broken or unsafe job script."""
    problems = []
    for name in ("nodes", "procs_per_node", "chain_jobs"):
        if getattr(cluster, name) < 1:
            problems.append(f"cluster.{name}={getattr(cluster, name)} must be >= 1")
    if cluster.cpus_per_node is not None and cluster.cpus_per_node < 1:
        problems.append(f"cluster.cpus_per_node={cluster.cpus_per_node} must be >= 1 (or null)")
    if cluster.signal_seconds < 0:
        problems.append(f"cluster.signal_seconds={cluster.signal_seconds} must be >= 0")
    for name in ("account", "partition", "qos", "constraint", "reservation", "hint", "gres", "exclude"):
        value = getattr(cluster, name)
        if value is not None and not _DIRECTIVE_VALUE.match(str(value)):
            problems.append(f"cluster.{name}={value!r} has characters Slurm does not accept there")
    try:
        limit = time_seconds(cluster.time)
        if cluster.signal_seconds >= limit:
            problems.append(
                f"cluster.signal_seconds={cluster.signal_seconds} is not less than cluster.time={cluster.time}"
            )
    except ValueError as e:
        problems.append(str(e))
    for i, directive in enumerate(cluster.extra_directives):
        if not str(directive).startswith("-") or "\n" in str(directive):
            problems.append(f"cluster.extra_directives[{i}]={directive!r} must be one option like --mem=0")
    for i, line in enumerate(cluster.setup):
        if "\n" in str(line):
            problems.append(f"cluster.setup[{i}] holds a newline: give one list entry per line")
        elif SECRET_NAME.search(str(line)) and "=" in str(line):
            problems.append(
                f"cluster.setup[{i}] seems to set a secret; job scripts never hold secrets: export it in the "
                "shell that submits (sbatch passes the environment to the job)"
            )
    for key in cluster.env:
        if not _ENV_NAME.match(str(key)):
            problems.append(f"cluster.env: {key!r} is not an environment variable name")
        elif SECRET_NAME.search(str(key)):
            problems.append(
                f"cluster.env.{key}: job scripts never hold secrets; export it in the shell that submits "
                "(sbatch passes the environment to the job)"
            )
    for name in ("python", "workdir"):
        value = getattr(cluster, name)
        if value is not None and "\n" in str(value):
            problems.append(f"cluster.{name} holds a newline")
    return problems


def check_cluster(cluster) -> None:
    problems = cluster_problems(cluster)
    if problems:
        raise ConfigError(problems)


def sbatch_directives(
    cluster, name: str, output: str, *, tasks_per_node: int, array: str | None, signal: str | None
) -> list[str]:
    """The #SBATCH lines of a job on `cluster`, in the order a reader looks for them."""
    cpus = cluster.cpus_per_node
    options: list[tuple[str, object]] = [
        ("job-name", job_name(name)),
        ("nodes", cluster.nodes),
        ("ntasks-per-node", tasks_per_node),
        ("cpus-per-task", cpus // tasks_per_node if cpus else None),
        ("gres", cluster.gres),
        ("hint", cluster.hint),
        ("constraint", cluster.constraint),
        ("partition", cluster.partition),
        ("account", cluster.account),
        ("qos", cluster.qos),
        ("reservation", cluster.reservation),
        ("exclude", cluster.exclude),
        ("time", cluster.time),
        ("signal", signal),
        ("array", array),
        ("output", output),
    ]
    lines = [f"#SBATCH --{key}={value}" for key, value in options if value is not None]
    return lines + [f"#SBATCH {directive}" for directive in cluster.extra_directives]
