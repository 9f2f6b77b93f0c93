"""A launch's #SBATCH directives and torch launcher options as one of our cluster presets plus the
cluster.* overrides where the job differs from it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from importlib.resources import files

import yaml

from bigscience_train.config.load import user_config_dir
from bigscience_train.config.megds_launch import Launch
from bigscience_train.config.megds_result import IGNORED, NO_EQUIVALENT, Override, Unmapped
from bigscience_train.config.schema import ClusterConfig

# #SBATCH options that are cluster.* fields of the same name.
SBATCH_FIELDS = (
    "account",
    "partition",
    "qos",
    "constraint",
    "reservation",
    "hint",
    "time",
    "exclude",
    "gres",
)
# Read into other fields (nodes, ranks and cpus per node).
SBATCH_SIZES = ("nodes", "cpus-per-task", "gpus-per-node", "ntasks-per-node")
RENDERED_ARRAYS = "ours renders arrays itself (chains over time limits: cluster.chain_jobs; sweeps)"
SBATCH_IGNORED = {
    "job-name": "names the run (model.name)",
    "output": "the rendered sbatch names its own log files",
    "error": "the rendered sbatch names its own log files",
    "array": RENDERED_ARRAYS,
    "dependency": RENDERED_ARRAYS,
    "signal": "ours asks for train.stop_signal cluster.signal_seconds before the limit",
    "ntasks": "ours runs cluster.nodes x cluster.procs_per_node ranks",
    "gpus": "ours asks for GPUs per node (cluster.gres)",
}
LAUNCHER_FIELDS = {
    "--nproc-per-node": "procs_per_node",
    "--num-gpus": "procs_per_node",
    "--nnodes": "nodes",
    "--num-nodes": "nodes",
    "--max-restarts": "max_restarts",
}


@dataclass
class ClusterMapping:
    preset: str | None
    overrides: list[Override] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def preset_values(name: str) -> dict:
    """A cluster preset's fields over the schema's defaults; the preset from the user's config directory
    first, as load_config finds it."""
    defaults = {k: getattr(v, "value", v) for k, v in asdict(ClusterConfig()).items()}
    user = user_config_dir()
    path = user / "cluster" / f"{name}.yaml" if user else None
    if path is None or not path.is_file():
        path = files("bigscience_train.configs") / "cluster" / f"{name}.yaml"
    return defaults | (yaml.safe_load(path.read_text()) or {})


def choose_preset(directives: dict[str, str | None]) -> tuple[str | None, str]:
    """Our preset for the job's #SBATCH constraint and partition, and why."""
    if not directives:
        return None, "no #SBATCH directives: no cluster preset chosen (add cluster=... cluster.nodes=...)"
    constraint = (directives.get("constraint") or "").lower()
    partition = (directives.get("partition") or "").lower()
    if "a100" in constraint or partition == "gpu_p5":
        return (
            "jean_zay_a100",
            f"Jean Zay A100 80 GB (constraint {constraint or '-'}, partition {partition or '-'})",
        )
    if "v100-32g" in constraint:
        return "jean_zay_v100_32g", "Jean Zay V100 32 GB (constraint v100-32g)"
    if "v100-16g" in constraint:
        return "jean_zay_v100_16g", "Jean Zay V100 16 GB (constraint v100-16g)"
    return "slurm", (
        f"no Jean Zay constraint or partition recognised (constraint {constraint or '-'}, "
        f"partition {partition or '-'}): the generic Slurm preset; check cluster.device"
    )


def launcher_fields(launch: Launch, mapping: ClusterMapping) -> dict[str, tuple[int, str]]:
    """nodes, ranks per node and restarts from the launcher's options; the others listed as unmapped."""
    found = {}
    for arg in launch.launcher:
        name = LAUNCHER_FIELDS.get(arg.key)
        if name and arg.text.isdigit():
            found[name] = (int(arg.text), f"launcher {arg.name}")
            continue
        reason = (
            "not a number in this file; the #SBATCH directives give the job's size"
            if name
            else "ours renders its own torchrun rendezvous in the sbatch script"
        )
        mapping.unmapped.append(Unmapped(arg.name, arg.text, IGNORED, reason, arg.line, "launcher"))
    return found


def gpus_per_node(d: dict[str, str | None]) -> int | None:
    if d.get("gres") and (m := re.search(r"gpu(?::\w+)?:(\d+)", d["gres"])):
        return int(m.group(1))
    if (d.get("gpus-per-node") or "").isdigit():
        return int(d["gpus-per-node"])
    return None


def map_cluster(launch: Launch) -> ClusterMapping:
    d = {directive.name: directive.value for directive in launch.sbatch}
    preset, why = choose_preset(d)
    mapping = ClusterMapping(preset)
    launcher = launcher_fields(launch, mapping)
    if preset is None:
        mapping.notes.append(why)
        for name, (value, source) in launcher.items():
            mapping.overrides.append(Override(f"cluster.{name}", value, source))
        return mapping
    mapping.overrides.append(Override("cluster", preset, "#SBATCH --constraint/--partition", why))
    wanted: list[tuple[str, object, str]] = []
    gpus = gpus_per_node(d)
    if gpus is not None:
        wanted.append(("procs_per_node", gpus, "#SBATCH --gres"))
    elif "procs_per_node" in launcher:
        gpus = launcher["procs_per_node"][0]
        wanted.append(("procs_per_node", *launcher["procs_per_node"]))
    if (d.get("nodes") or "").isdigit():
        wanted.append(("nodes", int(d["nodes"]), "#SBATCH --nodes"))
    elif "nodes" in launcher:
        wanted.append(("nodes", *launcher["nodes"]))
    if "max_restarts" in launcher:
        wanted.append(("max_restarts", *launcher["max_restarts"]))
    tasks = d.get("ntasks-per-node")
    tasks_n = int(tasks) if tasks and tasks.isdigit() else 1
    if tasks is not None and tasks_n == 1:
        wanted.append(("launcher", "torchrun", "#SBATCH --ntasks-per-node=1 (one launcher per node)"))
    elif tasks is not None and tasks_n == gpus:
        wanted.append(("launcher", "srun", "#SBATCH --ntasks-per-node = GPUs per node (one task per rank)"))
    if (d.get("cpus-per-task") or "").isdigit():
        cpus = int(d["cpus-per-task"]) * tasks_n
        wanted.append(("cpus_per_node", cpus, "#SBATCH --cpus-per-task x --ntasks-per-node"))
    wanted += [(name, d[name], f"#SBATCH --{name}") for name in SBATCH_FIELDS if d.get(name) is not None]
    extra = []
    for directive in launch.sbatch:
        name, value = directive.name, directive.value or ""
        if name in SBATCH_IGNORED:
            mapping.unmapped.append(
                Unmapped(f"--{name}", value, IGNORED, SBATCH_IGNORED[name], directive.line, "sbatch")
            )
        elif name == "ntasks-per-node" and tasks_n not in (1, gpus):
            reason = "ours runs one task per node (torchrun) or one per GPU (srun)"
            mapping.unmapped.append(
                Unmapped(f"--{name}", value, NO_EQUIVALENT, reason, directive.line, "sbatch")
            )
        elif name not in SBATCH_FIELDS and name not in SBATCH_SIZES:
            extra.append(f"--{name}" + (f"={directive.value}" if directive.value is not None else ""))
    ours = preset_values(preset)
    if extra:
        wanted.append(
            ("extra_directives", list(ours["extra_directives"]) + extra, "#SBATCH (written as given)")
        )
    for name, value, source in wanted:
        if str(ours.get(name)) != str(value):
            mapping.overrides.append(Override(f"cluster.{name}", value, source))
    return mapping
