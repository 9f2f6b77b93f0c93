"""Sbatch scripts: training runs (single, chained, or a sweep array) and arrays of plain commands.

A script is self-contained: directives, site setup, the absolute Python and working directory, and the
path of the resolved config it trains from. Every value that comes from a user is shell-quoted; secrets are
never written (sbatch hands the submitting shell's environment to the job).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from bigscience_train import __version__
from bigscience_train.config.validate import signal_number
from bigscience_train.slurm.directives import sbatch_directives

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
}
# torchrun's agent forwards these to the ranks in any release; any other signal would kill the agent.
_TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
# torchrun options for a clean stop, with the torch release that brought each (the job's torch may be older).
_SIGNALS_FLAG = ("--signals-to-handle", "2.10")
_SHUTDOWN_FLAG = ("--shutdown-timeout", "2.12")
# Slurm may send --signal up to this many seconds early: the ranks get that long on top to save and exit.
SIGNAL_EARLY = 60
# Arguments the job's shell expands: the array task's index, the Python the script set, and the array task's
# item when the script lists one per task (command_script's `per_task`).
ARRAY_TASK = "${SLURM_ARRAY_TASK_ID}"
PYTHON = "${PYTHON}"
TASK_ITEM = "${TASK_ITEM}"
SHELL_VARS = (ARRAY_TASK, PYTHON, TASK_ITEM)


def q(value) -> str:
    return shlex.quote(str(value))


def bash_array(name: str, values: list[str]) -> str:
    return f"{name}=(" + " ".join(q(v) for v in values) + ")"


def command_line(args: list[str]) -> str:
    """Arguments shell-quoted, except SHELL_VARS within them, which the shell expands (in double quotes)."""
    pattern = "(" + "|".join(re.escape(v) for v in SHELL_VARS) + ")"
    return " ".join(
        "".join(f'"{part}"' if part in SHELL_VARS else q(part) for part in re.split(pattern, a) if part)
        for a in args
    )


@dataclass
class Job:
    name: str
    cluster: object
    python: str
    workdir: str
    output: str
    tasks_per_node: int
    array: str | None = None
    signal: str | None = None
    description: str = ""


def directive_path(label: str, path: str) -> str:
    """A path as an #SBATCH value: sbatch reads double quotes there (no shell does)."""
    if re.search(r'["\n\r]', path):
        raise ValueError(f"{label} {path!r} holds a double quote or a newline, which #SBATCH cannot take")
    return f'"{path}"'


def header(job: Job) -> list[str]:
    c = job.cluster
    lines = [
        "#!/bin/bash",
        "# " + " ".join(job.description.split()),
        f"# Rendered by `bigscience slurm` (bigscience_train {__version__}) for cluster {c.name}.",
        *sbatch_directives(
            c,
            job.name,
            directive_path("log path", job.output),
            tasks_per_node=job.tasks_per_node,
            array=job.array,
            signal=job.signal,
        ),
        f"#SBATCH --chdir={directive_path('working directory', job.workdir)}",
        "",
        "set -uo pipefail",
    ]
    if c.modules:
        lines += ["", "module purge", *(f"module load {q(m)}" for m in c.modules)]
    if c.setup:
        lines += ["", "# Site setup (cluster.setup)", *map(str, c.setup)]
    env = {**(OFFLINE_ENV if c.offline else {}), **{str(k): str(v) for k, v in c.env.items()}}
    env["PYTHONUNBUFFERED"] = "1"
    lines += [""]
    if c.offline:
        lines += ["# Compute nodes have no internet: no hub downloads; wandb runs are synced later."]
    lines += [f"export {k}={q(v)}" for k, v in env.items()]
    lines += ["", f"PYTHON={q(job.python)}", f"cd {q(job.workdir)}"]
    return lines


def master_address() -> list[str]:
    """The first node of the allocation, by the address Slurm reaches it at (its NodeAddr)."""
    return [
        'MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_ADDR=$(scontrol show node \"$MASTER_NODE\" | sed -n 's/^ *NodeAddr=\\([^ ]*\\).*/\\1/p')",
        "export MASTER_ADDR=${MASTER_ADDR:-$MASTER_NODE}",
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
    ]


def torchrun_stop_options(stop_signal: str, shutdown_seconds: int) -> list[str]:
    """Lines that set TORCHRUN_STOP to the torchrun options for a clean stop on `stop_signal` that the job's
    torchrun has, with a warning in the log for each it lacks."""
    name = signal_number(stop_signal).name
    wanted = [(_SHUTDOWN_FLAG, shutdown_seconds, f"it kills the ranks 30 s after {name}, saved or not")]
    if name not in _TORCHRUN_SIGNALS:
        handled = ",".join([*_TORCHRUN_SIGNALS, name])
        wanted.insert(0, (_SIGNALS_FLAG, handled, f"{name} kills it; set train.stop_signal=SIGTERM"))
    lines = [
        "# torchrun's stop options came in later releases: the job asks its own torchrun's --help, which",
        "# holds for any build of its torch (a version number does not: source builds, backports).",
        'TORCHRUN_HELP=$("$PYTHON" -m torch.distributed.run --help 2>&1)',
        "TORCHRUN_STOP=",
    ]
    for (flag, release), value, without in wanted:
        lines += [
            "case $TORCHRUN_HELP in",
            f'  *{flag}*) TORCHRUN_STOP+=" {flag}={value}" ;;',
            f'  *) echo "warning: this torchrun has no {flag} (torch < {release}): {without}" ;;',
            "esac",
        ]
    return lines


def launch_training(cluster, stop_signal: str) -> list[str]:
    """srun of the trainer on every node, reading "$CONFIG"."""
    if cluster.launcher.value == "srun":
        return [
            *master_address(),
            "srun --kill-on-bad-exit=1 --label \\",
            '  "$PYTHON" -m bigscience_train.cli train --config-file "$CONFIG"',
        ]
    restarts = []
    if cluster.max_restarts:
        restarts = [
            "# Restarted workers must not share torchrun's rendezvous store: they would read the previous",
            "# attempt's addresses and fail to connect (pytorch/pytorch#135712).",
            "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        ]
    return [
        *master_address(),
        *torchrun_stop_options(stop_signal, cluster.signal_seconds + SIGNAL_EARLY),
        *restarts,
        "# Each rank's output lines start with [rankN].",
        "export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[rank${rank}]: '",
        "# TORCHRUN_STOP holds flags with plain values: unquoted, it expands into those words.",
        'srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \\',
        f'  --nnodes="$SLURM_NNODES" --nproc-per-node={cluster.procs_per_node} \\',
        '  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \\',
        f"  --max-restarts={cluster.max_restarts} --tee=3 $TORCHRUN_STOP \\",
        '  -m bigscience_train.train --config-file "$CONFIG"',
    ]


def training_body(cluster, stop_signal: str, chain: bool) -> list[str]:
    """With RUN_DIR, CONFIG and KILL_SWITCH set: train unless the kill switch is on, then let the chain
    decide whether the next job runs."""
    train = launch_training(cluster, stop_signal)
    return [
        'rm -f "$RUN_DIR/last_stop.json"',
        'if [ -n "$KILL_SWITCH" ] && [ -e "$KILL_SWITCH" ]; then',
        '  echo "kill switch $KILL_SWITCH is on: not training (remove it to continue the run)"',
        "  rc=0",
        "else",
        *(f"  {line}" for line in train),
        "  rc=$?",
        "fi",
        '"$PYTHON" -m bigscience_train.slurm.chain "$RUN_DIR" --exit-code "$rc" --kill-switch "$KILL_SWITCH"'
        + (" --chain" if chain else ""),
    ]


def training_script(
    job: Job, run_dirs: list[str], kill_switches: list[str | None], stop_signal: str, chain: bool
) -> str:
    """One run (optionally a chain) or, with several run directories, a sweep array of runs."""
    lines = header(job) + [""]
    switches = [k or "" for k in kill_switches]
    if len(run_dirs) == 1:
        lines += [f"RUN_DIR={q(run_dirs[0])}", f"KILL_SWITCH={q(switches[0])}"]
    else:
        lines += [
            "# One run per array task.",
            bash_array("RUN_DIRS", run_dirs),
            bash_array("KILL_SWITCHES", switches),
            "RUN_DIR=${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}",
            "KILL_SWITCH=${KILL_SWITCHES[$SLURM_ARRAY_TASK_ID]}",
        ]
    lines += ['CONFIG="$RUN_DIR/slurm/config.yaml"', ""]
    return "\n".join(lines + training_body(job.cluster, stop_signal, chain)) + "\n"


def command_script(job: Job, commands: list[list[str]], per_task: list[str] | None = None) -> str:
    """Plain commands run one after the other on the first node (SHELL_VARS expand in the job); with
    `per_task`, an array job's task i has TASK_ITEM set to per_task[i]."""
    return "\n".join([*header(job), "", *task_items(per_task), *map(command_line, commands)]) + "\n"


def task_items(per_task: list[str] | None) -> list[str]:
    if not per_task:
        return []
    return [bash_array("TASK_ITEMS", per_task), "TASK_ITEM=${TASK_ITEMS[$SLURM_ARRAY_TASK_ID]}"]


def distributed_script(job: Job, module_args: list[str], per_task: list[str] | None = None) -> str:
    """`python -m MODULE ARGS` (module_args) as one process group over every node of the job: torchrun on
    each node, meeting at the first node's address, or with cluster.launcher=srun one srun task per rank.
    SHELL_VARS expand in the arguments; per_task as command_script's."""
    c = job.cluster
    module = command_line(module_args)
    if c.launcher.value == "srun":
        launch = ['srun --kill-on-bad-exit=1 --label "$PYTHON" -m ' + module]
    else:
        launch = [
            "# Each rank's output lines start with [rankN].",
            "export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[rank${rank}]: '",
            'srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \\',
            f'  --nnodes="$SLURM_NNODES" --nproc-per-node={c.procs_per_node} --max-restarts=0 --tee=3 \\',
            '  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \\',
            f"  -m {module}",
        ]
    return "\n".join([*header(job), "", *task_items(per_task), *master_address(), *launch]) + "\n"


def write_script(path: Path, text: str) -> Path:
    from bigscience_train.fsutil import atomic_write_text

    atomic_write_text(path, text)
    path.chmod(0o755)
    return path
