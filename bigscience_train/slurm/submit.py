"""Render, check and submit Slurm jobs: a training run (or chain), a sweep array, a preprocessing array.

Each config is validated for the job's world size (nodes x ranks per node) and its input files checked before
anything is written or queued: no queue time is spent on a run that would fail at start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from bigscience_train.config import (
    ConfigError,
    cluster_world_size,
    config_problems,
    data_parallel_size,
    load_config,
    load_config_file,
    to_yaml,
)
from bigscience_train.config.validate import file_problems
from bigscience_train.excluded_nodes import read_excluded_nodes
from bigscience_train.fsutil import atomic_write_text
from bigscience_train.plan.estimate import layout_of, make_plan
from bigscience_train.plan.report import fit_verdict, memory_breakdown
from bigscience_train.slurm import SlurmError
from bigscience_train.slurm.directives import cluster_problems
from bigscience_train.slurm.script import (
    ARRAY_TASK,
    PYTHON,
    TASK_ITEM,
    Job,
    command_script,
    distributed_script,
    training_script,
    write_script,
)
from bigscience_train.slurm.status import JOBS_FILE, run_status
from bigscience_train.slurm.sweep import expand_sweep, swept_keys, task_label


@dataclass
class Prepared:
    script_path: Path
    script: str
    # Where the submitted job is recorded: (directory, array task or None).
    records: list[tuple[Path, int | None]]


def check(cfg, label: str = "", memory: bool = True) -> None:
    """Every problem of the run and of its cluster preset, at once; and, unless `memory` is off, whether the
    planner predicts that the layout fits the device (with its breakdown when it does not)."""
    problems = config_problems(cfg, cluster_world_size(cfg.cluster)) + cluster_problems(cfg.cluster)
    if not any(p.startswith("data.blend") for p in problems):
        problems += file_problems(cfg)
    if memory and not problems:
        plan = make_plan(cfg, layout_of(cfg))
        if plan.fits is False:
            problems.append(
                f"{fit_verdict(plan)} (bigscience plan --search finds layouts that fit; --force submits anyway)\n"
                + "\n".join(memory_breakdown(plan))
            )
    if problems:
        raise ConfigError([f"{label}{p}" for p in problems])


def _place(cluster) -> tuple[str, Path]:
    python = cluster.python or sys.executable
    return python, Path(cluster.workdir or os.getcwd()).resolve()


def _signal_directive(cfg) -> str:
    name = cfg.train.stop_signal
    return f"{name.removeprefix('SIG')}@{cfg.cluster.signal_seconds}"


def _tasks_per_node(cluster) -> int:
    return 1 if cluster.launcher.value == "torchrun" else cluster.procs_per_node


def _absolute(workdir: Path, path: str | None) -> str | None:
    return None if path is None else str((workdir / path).resolve())


def _layout(cfg) -> str:
    c, p = cfg.cluster, cfg.parallel
    dp = data_parallel_size(cfg, cluster_world_size(c))
    return f"{c.nodes} node(s) x {c.procs_per_node} ranks, (tp, pp, dp) = ({p.tp}, {p.pp}, {dp})"


def _write_run_config(run_dir: Path, cfg) -> None:
    (run_dir / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "slurm" / "config.yaml", to_yaml(cfg))


def prepare_training(overrides: list[str], force: bool = False, memory: bool = True) -> Prepared:
    """RUN/slurm/config.yaml (the resolved config every job of the chain trains from) and job.sbatch.
    memory: refuse a layout the planner predicts not to fit (off where a dry run measured it)."""
    cfg = load_config(overrides)
    check(cfg, memory=memory and not force)
    return render_training(cfg)


def with_excluded_nodes(cluster, run_dir: Path):
    """The cluster preset with the nodes the run's health checks failed (RUN/slurm/excluded_nodes) added to
    its `exclude`."""
    given = [n for n in (cluster.exclude or "").split(",") if n]
    found = [n for n in read_excluded_nodes(run_dir) if n not in given]
    if not found:
        return cluster
    return OmegaConf.merge(cluster, {"exclude": ",".join(given + found)})


def render_training(cfg, first_task: int = 1) -> Prepared:
    """job.sbatch of a checked config; a chain's array runs tasks first_task..cluster.chain_jobs."""
    c = cfg.cluster
    python, workdir = _place(c)
    run_dir = Path(_absolute(workdir, cfg.run_dir))
    chain = c.chain_jobs > 1
    job = Job(
        name=cfg.name,
        cluster=with_excluded_nodes(c, run_dir),
        python=python,
        workdir=str(workdir),
        output=str(run_dir / "slurm" / "logs" / ("%x-%A_%a.out" if chain else "%x-%j.out")),
        tasks_per_node=_tasks_per_node(c),
        array=f"{first_task}-{c.chain_jobs}%1" if chain else None,
        signal=_signal_directive(cfg),
        description=f"Training run {cfg.name}: model {cfg.model.name} on {_layout(cfg)}"
        + (f"; a chain of up to {c.chain_jobs} jobs of {c.time}" if chain else ""),
    )
    script = training_script(
        job, [str(run_dir)], [_absolute(workdir, cfg.train.kill_switch)], cfg.train.stop_signal, chain
    )
    _write_run_config(run_dir, cfg)
    path = write_script(run_dir / "slurm" / "job.sbatch", script)
    return Prepared(path, script, [(run_dir, None)])


def prepare_sweep(overrides: list[str], max_parallel: int | None, force: bool = False) -> Prepared:
    """One array task per combination, each with its own run directory under the sweep's run_dir."""
    keys = swept_keys(overrides)
    if not keys:
        raise ValueError("no swept key: give comma-separated values, e.g. optim.lr=1e-4,3e-4")
    cluster_keys = [k for k in keys if k.lstrip("+~").startswith("cluster")]
    if cluster_keys:
        raise ValueError(f"{', '.join(cluster_keys)}: one array runs on one cluster layout; sweep other keys")
    base = load_config([o for o in overrides if o.split("=", 1)[0] not in keys])
    c = base.cluster
    if c.chain_jobs > 1:
        raise ValueError(
            f"cluster.chain_jobs={c.chain_jobs}: sweep tasks run one job each; bound them with "
            "train.exit_duration_minutes, or submit long runs one by one to chain them"
        )
    python, workdir = _place(c)
    root = Path(_absolute(workdir, base.run_dir))
    combos = expand_sweep(overrides)
    tasks, problems = [], []
    for i, combo in enumerate(combos):
        run_dir = root / task_label(i, combo, keys)
        if "'" in str(run_dir):
            raise ValueError(f"sweep run directory {run_dir} holds a quote")
        cfg = load_config([*combo, f"run_dir='{run_dir}'", f"name={base.name}-{i:02d}"])
        try:
            check(cfg, label=f"task {i} ({' '.join(combo)}): ", memory=not force)
        except ConfigError as e:
            problems += e.problems
        tasks.append((run_dir, cfg, combo))
    if problems:
        raise ConfigError(problems)
    job = Job(
        name=base.name,
        cluster=c,
        python=python,
        workdir=str(workdir),
        output=str(root / "slurm" / "logs" / "%x-%A_%a.out"),
        tasks_per_node=_tasks_per_node(c),
        array=f"0-{len(tasks) - 1}" + (f"%{max_parallel}" if max_parallel else ""),
        signal=_signal_directive(base),
        description=f"Sweep {base.name}: {len(tasks)} runs of {_layout(base)} ({', '.join(keys)})",
    )
    script = training_script(
        job,
        [str(d) for d, _, _ in tasks],
        [_absolute(workdir, cfg.train.kill_switch) for _, cfg, _ in tasks],
        base.train.stop_signal,
        chain=False,
    )
    for run_dir, cfg, _ in tasks:
        _write_run_config(run_dir, cfg)
    (root / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    manifest = [{"task": i, "overrides": combo, "run_dir": str(d)} for i, (d, _, combo) in enumerate(tasks)]
    atomic_write_text(root / "sweep.json", json.dumps(manifest, indent=2) + "\n")
    path = write_script(root / "slurm" / "sweep.sbatch", script)
    return Prepared(path, script, [(root, None)] + [(d, i) for i, (d, _, _) in enumerate(tasks)])


def prepare_preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer: str,
    num_shards: int,
    preprocess_args: list[str],
    overrides: list[str],
) -> tuple[Prepared, Prepared]:
    """An array of `data preprocess --shard i --num-shards K`, and a `data merge` job to run after it."""
    if num_shards < 1:
        raise ValueError(f"--num-shards={num_shards} must be >= 1")
    c = load_config(overrides).cluster
    c.nodes, c.gres, c.chain_jobs = 1, None, 1
    problems = cluster_problems(c)
    if not Path(tokenizer).is_file():
        problems.append(f"--tokenizer: no such file {tokenizer}")
    if problems:
        raise ConfigError(problems)
    python, workdir = _place(c)
    prefix = Path(_absolute(workdir, output_prefix))
    jobs_dir = prefix.parent / f"{prefix.name}.slurm"
    (jobs_dir / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    shard = f"{prefix}.shard{ARRAY_TASK}"
    cli = [PYTHON, "-m", "bigscience_train.cli", "data"]

    def job(name: str, array: str | None, what: str) -> Job:
        pattern = "%x-%A_%a.out" if array else "%x-%j.out"
        return Job(
            name, c, python, str(workdir), str(jobs_dir / "slurm" / "logs" / pattern), 1, array, None, what
        )

    shards_script = command_script(
        job(f"{prefix.name}-shards", f"0-{num_shards - 1}", f"Tokenize {num_shards} shards of {inputs}"),
        [
            [
                *cli,
                "preprocess",
                "--input",
                *inputs,
                "--output-prefix",
                shard,
                "--tokenizer",
                tokenizer,
                "--shard",
                ARRAY_TASK,
                "--num-shards",
                str(num_shards),
                *preprocess_args,
            ]
        ],
    )
    shard_prefixes = [f"{prefix}.shard{i}" for i in range(num_shards)]
    merge_script = command_script(
        job(f"{prefix.name}-merge", None, f"Merge the {num_shards} shards into {prefix}"),
        [[*cli, "merge", "--input", *shard_prefixes, "--output-prefix", str(prefix)]],
    )
    records = [(jobs_dir, None)]
    return (
        Prepared(write_script(jobs_dir / "slurm" / "shards.sbatch", shards_script), shards_script, records),
        Prepared(write_script(jobs_dir / "slurm" / "merge.sbatch", merge_script), merge_script, records),
    )


def prepare_eval(target: str, overrides: list[str], max_parallel: int | None = None) -> Prepared | None:
    """An evaluation job on the fewest nodes that hold one model (ceil(tp x pp / procs_per_node); dp fills
    the rest), `python -m evaluation` on every rank. `target`: a run directory, for an array with one task per
    checkpoint not yet evaluated on the tasks (None: nothing left); or hf=DIR, for one job whose rank 0 imports
    DIR into eval.import_dir, which every node sees."""
    from evaluation.run import expand_short_keys, hf_paths, pending_checkpoints

    hf = target.removeprefix("hf=") if target.startswith("hf=") else None
    if hf is None and "=" in target:
        raise ValueError(f"{target!r}: give a run directory or hf=DIR first, then the overrides")
    cfg = load_config(expand_short_keys([*overrides, *([f"hf={hf}"] if hf else [])]))
    c, par = cfg.cluster, cfg.parallel
    model_ranks = par.tp * par.pp
    c.nodes, c.chain_jobs = -(-model_ranks // max(c.procs_per_node, 1)), 1
    world = c.nodes * c.procs_per_node
    problems = cluster_problems(c)
    if world % model_ranks:
        problems.append(
            f"parallel.tp x parallel.pp = {model_ranks} ranks do not divide the job's {world} "
            f"({c.nodes} node(s) x cluster.procs_per_node={c.procs_per_node})"
        )
    if par.virtual_stages > 1:
        problems.append("parallel.virtual_stages > 1: evaluation runs one pipeline stage per rank")
    python, workdir = _place(c)
    # Given again below as absolute paths, which every node reads alike.
    dropped = ("run", "checkpoint", "hf", "output", "import_dir")
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+").removeprefix("eval.") not in dropped]
    layout = f"(tp, pp, dp) = ({par.tp}, {par.pp}, {world // model_ranks}) on {c.nodes} node(s)"
    if hf:
        hf_dir = Path(_absolute(workdir, hf))
        if not (hf_dir / "config.json").is_file():
            problems.append(f"hf={hf_dir} has no config.json: not a Hugging Face model directory")
        if problems:
            raise ConfigError(problems)
        output, import_dir = (Path(_absolute(workdir, str(p))) for p in hf_paths(cfg.eval))
        root, array, per_task = output.parent, None, None
        args = [f"hf={hf_dir}", f"output={output}", f"import_dir={import_dir}"]
        what = f"Evaluate {hf_dir} (imported into {import_dir})"
    else:
        if problems:
            raise ConfigError(problems)
        root = Path(_absolute(workdir, target))
        output = Path(_absolute(workdir, cfg.eval.output)) if cfg.eval.output else None
        steps = pending_checkpoints(root, list(cfg.eval.tasks), output or root / "eval")
        if not steps:
            return None
        array = f"0-{len(steps) - 1}" + (f"%{max_parallel}" if max_parallel else "")
        per_task = [str(s) for s in steps]
        args = [f"checkpoint={TASK_ITEM}", *([f"output={output}"] if output else [])]
        what = f"Evaluate {len(steps)} checkpoint(s) of {root}"
    (root / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    job = Job(
        f"{root.name}-eval",
        c,
        python,
        str(workdir),
        str(root / "slurm" / "logs" / ("%x-%A_%a.out" if array else "%x-%j.out")),
        _tasks_per_node(c),
        array,
        None,
        f"{what} on {', '.join(cfg.eval.tasks)} at {layout}",
    )
    script = distributed_script(job, ["evaluation", *args, *kept], per_task)
    return Prepared(write_script(root / "slurm" / "eval.sbatch", script), script, [(root, None)])


def active_jobs(run_dir: Path) -> list[str]:
    jobs, _ = run_status(run_dir)
    return [j.job_id for j in jobs if j.active]


def resubmit_chain(run_dir: Path, first_task: int, dependency: str | None = None) -> str:
    """From inside a job of a chain: submits its tasks first_task.. again, rendered anew from
    RUN/slurm/config.yaml (with the nodes excluded since); returns the new array's id."""
    prepared = render_training(load_config_file(Path(run_dir) / "slurm" / "config.yaml"), first_task)
    # The job's own SLURM_* and SBATCH_* variables would pass its allocation to the new job (sbatch hands
    # its environment on): only where the cluster is stays.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_")) or k == "SLURM_CONF"
    }
    return sbatch(prepared, "train", dependency=dependency, env=env)


def sbatch(prepared: Prepared, kind: str, dependency: str | None = None, env: dict | None = None) -> str:
    """Submit; record the job id in each directory's slurm/jobs.jsonl; return the id."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency={dependency}")
    done = subprocess.run(
        [*cmd, str(prepared.script_path)], capture_output=True, text=True, check=False, env=env
    )
    if done.returncode != 0:
        raise SlurmError(
            f"sbatch {prepared.script_path} failed: {done.stderr.strip() or done.stdout.strip()}"
        )
    job_id = done.stdout.strip().split(";")[0]
    submitted = time.strftime("%Y-%m-%dT%H:%M:%S")
    for directory, task in prepared.records:
        record = {"job_id": job_id, "kind": kind, "script": str(prepared.script_path), "submitted": submitted}
        if task is not None:
            record["array_task"] = task
        path = directory / "slurm" / JOBS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return job_id
