"""Slurm scripts, sweeps and chain decisions, checked without a cluster (tests/test_slurm_cluster.py runs
them on a real one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bigscience_train.config import ConfigError, OverrideError
from bigscience_train.last_stop import write_last_stop
from bigscience_train.slurm.chain import decide
from bigscience_train.slurm.directives import time_seconds
from bigscience_train.slurm.submit import prepare_sweep, prepare_training
from bigscience_train.slurm.sweep import expand_sweep
from tests.conftest import ROOT, data_overrides

GOLDEN = ROOT / "tests" / "golden" / "jean_zay_v100_32g.sbatch"
FAKE_PYTHON = "/gpfswork/rech/six/commun/conda/tr1-13b/bin/python"


def jean_zay_overrides(tiny_data: dict, tmp_path: Path) -> list[str]:
    """tr1-13B on 128 nodes of 4 x V100 32 GB (TP4 x ZeRO-3 DP128: pipeline parallelism is not there yet)."""
    return [
        *data_overrides(tiny_data, tmp_path / "runs" / "tr1-13b"),
        "name=tr1-13b",
        "model=tr1_13b",
        "model.vocab_size=512",
        "parallel.tp=4",
        "parallel.dp_shard=zero3",
        "parallel.recompute=full",
        "train.global_batch_size=1024",
        "train.iters=100",
        "precision=fp16",
        "cluster=jean_zay_v100_32g",
        "cluster.nodes=128",
        "cluster.account=six@v100",
        "cluster.modules=[pytorch-gpu/py3/2.1.1]",
        f"cluster.python={FAKE_PYTHON}",
        f"cluster.workdir={tmp_path}",
    ]


def test_jean_zay_script_matches_the_reviewed_golden_file(tiny_data, tmp_path):
    prepared = prepare_training(jean_zay_overrides(tiny_data, tmp_path))
    script = prepared.script.replace(str(tmp_path), "<WORKDIR>")
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text()
    assert prepared.script_path.read_text() == prepared.script
    written = OmegaConf.load(prepared.script_path.parent / "config.yaml")
    assert written.cluster.nodes == 128 and written.parallel.tp == 4 and written.precision.dtype == "fp16"
    assert subprocess.run(["bash", "-n", str(prepared.script_path)]).returncode == 0


def test_script_directives_follow_the_preset(tiny_data, tmp_path):
    lines = prepare_training(jean_zay_overrides(tiny_data, tmp_path)).script.splitlines()
    for directive in (
        "--nodes=128",
        "--ntasks-per-node=1",
        "--cpus-per-task=40",
        "--gres=gpu:4",
        "--hint=nomultithread",
        "--constraint=v100-32g",
        "--time=20:00:00",
        "--signal=USR1@600",
        "--array=1-10%1",
    ):
        assert f"#SBATCH {directive}" in lines
    one_per_rank = prepare_training(
        [*jean_zay_overrides(tiny_data, tmp_path), "cluster.launcher=srun", "cluster.chain_jobs=1"]
    ).script
    assert "#SBATCH --ntasks-per-node=4" in one_per_rank and "#SBATCH --cpus-per-task=10" in one_per_rank
    assert "--array" not in one_per_rank and "torch.distributed.run" not in one_per_rank
    restarting = prepare_training([*jean_zay_overrides(tiny_data, tmp_path), "cluster.max_restarts=2"]).script
    assert "--max-restarts=2 " in restarting and "--max-restarts=0 " in "\n".join(lines)
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restarting
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in "\n".join(lines)
    with pytest.raises(ConfigError, match="cluster.max_restarts=2 needs cluster.launcher=torchrun"):
        prepare_training(
            [*jean_zay_overrides(tiny_data, tmp_path), "cluster.launcher=srun", "cluster.max_restarts=2"]
        )


def fake_slurm_bin(tmp_path: Path) -> Path:
    """srun that records its arguments instead of launching, and scontrol that knows one node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\ncase "$2" in hostnames) echo node1 ;; node) echo "   NodeAddr=127.0.0.1" ;; esac\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


# What torchrun --help lists of the stop options: before 2.10, 2.10-2.11; the installed torch is checked too.
OLD_HELP = {
    "2.9": "usage: torchrun [-h] [--nnodes NNODES] [--max-restarts MAX_RESTARTS]",
    "2.11": "usage: torchrun [-h] [--max-restarts MAX_RESTARTS] [--signals-to-handle SIGNALS_TO_HANDLE]",
}


@pytest.mark.parametrize("torch_help", ["2.9", "2.11", "installed"])
def test_torchrun_gets_the_stop_options_its_torch_has(tiny_data, tmp_path, torch_help):
    bin_dir = fake_slurm_bin(tmp_path)
    python = tmp_path / "python"
    help_file = tmp_path / "help.txt"
    if torch_help in OLD_HELP:
        help_file.write_text(OLD_HELP[torch_help] + "\n")
    # The job's Python: this one, except that an older torchrun's --help comes from help.txt.
    python.write_text(
        "#!/bin/bash\n"
        f'if [ "$*" = "-m torch.distributed.run --help" ] && [ -f {help_file} ]; then\n'
        f"  cat {help_file}; exit 0\n"
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    prepared = prepare_training(
        [
            *data_overrides(tiny_data, tmp_path / "run"),
            "train.iters=1",
            "cluster=local_dev",
            f"cluster.python={python}",
            f"cluster.workdir={tmp_path}",
        ]
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SRUN_ARGS": str(tmp_path / "srun_args"),
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_JOB_ID": "7",
        "SLURM_NNODES": "2",
    }
    done = subprocess.run(["bash", str(prepared.script_path)], capture_output=True, text=True, env=env)
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args[:4] == ["--kill-on-bad-exit=1", str(python), "-m", "torch.distributed.run"], done.stdout
    signals = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    shutdown = "--shutdown-timeout=90"  # cluster.signal_seconds=30 of local_dev, and Slurm's minute early
    help_text = (
        OLD_HELP.get(torch_help)
        or subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True, text=True
        ).stdout
    )
    expected = [flag for flag in (signals, shutdown) if flag.split("=")[0] in help_text]
    assert [a for a in args if a.startswith(("--signals-to-handle", "--shutdown-timeout"))] == expected
    assert args[-4:] == [
        "-m",
        "bigscience_train.train",
        "--config-file",
        str(tmp_path / "run/slurm/config.yaml"),
    ]
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning: this torchrun has no")]
    assert len(warnings) == 2 - len(expected), done.stdout


def test_a_stop_signal_every_torchrun_forwards_needs_no_signals_option(tiny_data, tmp_path):
    overrides = [*data_overrides(tiny_data, tmp_path / "run"), "train.iters=1", "cluster=local_dev"]
    term = prepare_training([*overrides, "train.stop_signal=TERM"]).script
    assert "--signals-to-handle" not in term and "--shutdown-timeout" in term
    # A name without SIG is the same signal, and torchrun takes it with SIG.
    assert (
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
        in prepare_training([*overrides, "train.stop_signal=USR2"]).script
    )


def test_user_values_stay_inert_and_secrets_stay_out(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-key-value")
    pwn = tmp_path / "pwned"
    run_dir = tmp_path / "runs" / "evil"
    prepared = prepare_training(
        [
            *data_overrides(tiny_data, run_dir),
            f"name='x$(touch {pwn})'",
            "train.iters=1",
            "cluster=local_dev",
            f"cluster.workdir={tmp_path}",
            f"+cluster.env.NOTE='$(touch {pwn}) `touch {pwn}`'",
        ]
    )
    assert "s3cr3t" not in prepared.script
    # Run the script itself with the kill switch on: every line but the training launch executes.
    (run_dir / "kill-switch").touch()
    done = subprocess.run(["bash", str(prepared.script_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kill switch" in done.stdout and not pwn.exists()


def test_secrets_in_the_preset_are_refused(tiny_data, tmp_path):
    base = [*data_overrides(tiny_data, tmp_path / "r"), "train.iters=1", "cluster=local_dev"]
    with pytest.raises(ConfigError) as e:
        prepare_training([*base, "+cluster.env.WANDB_API_KEY=abc", "cluster.setup=['export HF_TOKEN=abc']"])
    text = str(e.value)
    assert (
        "cluster.env.WANDB_API_KEY" in text and "cluster.setup[0]" in text and "abc" not in text.split(":")[0]
    )


def test_every_problem_is_reported_before_anything_is_written(tiny_data, tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(ConfigError) as e:
        prepare_training(
            [
                *data_overrides(tiny_data, run_dir),
                "train.iters=1",
                "cluster=local_dev",
                "cluster.procs_per_node=3",
                "parallel.tp=4",
                "cluster.time=soon",
                "cluster.partition='a b'",
                "parallel.pp=2",
            ]
        )
    problems = e.value.problems
    assert any("world size 6 is not divisible by parallel.tp=4 x parallel.pp=2" in p for p in problems)
    assert any("cluster.time='soon'" in p for p in problems)
    assert any("cluster.partition='a b'" in p for p in problems)
    assert not run_dir.exists()


def test_submit_refuses_a_layout_predicted_not_to_fit(tiny_data, tmp_path):
    too_big = [*jean_zay_overrides(tiny_data, tmp_path), "parallel.dp_shard=none", "parallel.tp=2"]
    with pytest.raises(ConfigError) as e:
        prepare_training(too_big)
    text = str(e.value)
    assert "does NOT fit a 32 GB device" in text and "optimizer states" in text and "--force" in text
    assert prepare_training(too_big, force=True).script_path.is_file()


def test_slurm_time_formats():
    assert time_seconds("20:00:00") == 72000
    assert time_seconds("100:00:00") == 360000
    assert time_seconds("2-00:00:00") == 172800
    assert time_seconds("1-2") == 93600
    assert time_seconds("90") == 5400
    assert time_seconds("1:30") == 90
    with pytest.raises(ValueError, match="cluster.time='1h'"):
        time_seconds("1h")


def test_sweep_expands_like_hydra_and_gives_each_task_its_run():
    combos = expand_sweep(["optim.lr=1e-4,3e-4", "model=gpt_tiny,gpt_125m", "train.iters=5"])
    assert combos == [
        ["optim.lr=0.0001", "model=gpt_tiny", "train.iters=5"],
        ["optim.lr=0.0001", "model=gpt_125m", "train.iters=5"],
        ["optim.lr=0.0003", "model=gpt_tiny", "train.iters=5"],
        ["optim.lr=0.0003", "model=gpt_125m", "train.iters=5"],
    ]


def test_sweep_array_writes_one_config_per_task(tiny_data, tmp_path):
    prepared = prepare_sweep(
        [
            *data_overrides(tiny_data, tmp_path / "sweep"),
            "name=lrs",
            "optim.lr=1e-3,2e-3,3e-3",
            "train.iters=2",
            "cluster=local_dev",
            "cluster.nodes=1",
        ],
        max_parallel=2,
    )
    assert "#SBATCH --array=0-2%2" in prepared.script
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [t["task"] for t in manifest] == [0, 1, 2]
    lrs = [OmegaConf.load(Path(t["run_dir"]) / "slurm" / "config.yaml").optim.lr for t in manifest]
    assert lrs == [1e-3, 2e-3, 3e-3]
    assert all(t["run_dir"] in prepared.script for t in manifest)
    with pytest.raises(ValueError, match="cluster.nodes"):
        prepare_sweep(["cluster.nodes=1,2", "train.iters=1"], None)
    with pytest.raises(ValueError, match="no swept key"):
        prepare_sweep(["train.iters=1"], None)


def test_chain_decisions(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code, message = decide(run, 1, None, chain=True)
    assert code == 1 and "without a clean stop" in message
    write_last_stop(run, "signal", 40, 1000, "step_0000040")
    code, message = decide(run, 1, None, chain=True)
    assert code == 0 and "stopped at step 40 (signal)" in message
    write_last_stop(run, "iters", 100, 5000, "step_0000100")
    code, message = decide(run, 0, None, chain=False)
    assert code == 0 and "training finished at step 100" in message
    (run / "kill-switch").touch()
    code, message = decide(run, 0, str(run / "kill-switch"), chain=False)
    assert code == 0 and "kill switch" in message
    (run / "kill-switch").unlink()
    error = "5 consecutive fp16 gradient overflows at the minimum loss scale 1"
    write_last_stop(run, "loss_scale_floor", 140, 7000, "step_0000100", error=error)
    code, message = decide(run, 1, None, chain=False)
    assert code == 1 and "training failed at step 140" in message and error in message
    assert "not resumed" in message


def test_train_reads_a_resolved_config_file(tiny_data, tmp_path):
    prepared = prepare_training(
        [*data_overrides(tiny_data, tmp_path / "r"), "train.iters=2", "train.eval_iters=0"]
    )
    config = prepared.script_path.parent / "config.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "bigscience_train.cli", "train", "--config-file", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r" / "last_stop.json").read_text())["reason"] == "iters"
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("micro_batch_size:", "micro_batch_sizes:"))
    with pytest.raises(OverrideError, match="bad.yaml"):
        from bigscience_train.config import load_config_file

        load_config_file(bad)
