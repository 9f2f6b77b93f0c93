"""The package as a user gets it: the wheel of this checkout installed into a fresh virtual environment and run
from a directory outside the checkout, so the configs and the bundled tasks can only come from the wheel.

The new environment sees the project's own .venv for the dependencies through a .pth line naming its
site-packages: a plain path line does not run that directory's .pth files, so the editable install of this
checkout stays out of it (asserted below), and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from bigscience_train import __version__
from data_tools.corpus import stdlib_sources

ROOT = Path(__file__).resolve().parents[1]
# Everything a clean clone lacks: building from a copy keeps setuptools' build/ out of the checkout, and its
# stale files out of the wheel.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "outputs", "*.egg-info", "__pycache__", ".*_cache"
)
STEP_TIMEOUT = 150


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


@dataclass
class Installed:
    venv: Path
    site: Path
    work: Path
    env: dict

    @property
    def bigscience(self) -> str:
        return str(self.venv / "bin" / "bigscience")

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def run(self, cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
        return run(cmd, cwd or self.work, self.env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    base = tmp_path_factory.mktemp("package")
    work = base / "work"
    work.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "BIGSCIENCE_CONFIG_DIR")
    }
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONHASHSEED="0",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(base / "hf-datasets"),
    )
    shutil.copytree(ROOT, base / "src", ignore=NOT_SOURCES)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    run([*build, "-w", str(base / "dist"), str(base / "src")], base, env)
    (wheel,) = (base / "dist").glob("bigscience_train-*.whl")

    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, env)
    python = str(venv / "bin" / "python")
    site = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, env
        ).stdout.strip()
    )
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    find = "import importlib.util as u; print(u.find_spec('bigscience_train'))"
    assert run([python, "-c", find], work, env).stdout.strip() == "None", (
        "the checkout's editable install leaks in"
    )
    # --ignore-installed: pip sees the editable install's metadata on the .pth path and must leave it alone.
    run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        work,
        env,
    )
    return Installed(venv, site, work, env)


@pytest.mark.timeout(240)
def test_the_installed_cli_composes_the_packaged_configs_outside_the_checkout(installed):
    where = (
        "import bigscience_train, evaluation.tasks as t; print(bigscience_train.__file__); print(t.__file__)"
    )
    for path in installed.run([installed.python, "-c", where]).stdout.split():
        assert Path(path).is_relative_to(installed.site), path
    assert (
        installed.run([installed.bigscience, "--version"]).stdout.strip() == f"bigscience-train {__version__}"
    )
    job = installed.run([installed.bigscience, "train", "--cfg", "job", "model=tr1_13b"]).stdout
    assert "hidden_size: 5120" in job and "num_layers: 40" in job


@pytest.mark.timeout(540)
def test_the_installed_package_trains_evaluates_and_its_tasks_run_under_lm_evals_cli(installed, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, source in enumerate(stdlib_sources()[:30]):
        (docs / f"{i:02d}.txt").write_text(source.read_text(encoding="utf-8", errors="replace"))
    data = tmp_path / "data"
    bigscience = installed.bigscience
    installed.run(
        [bigscience, "data", "corpus", "--folder", str(docs), "--output", str(data / "corpus.jsonl")]
    )
    tokenizer = str(data / "tokenizer.json")
    installed.run(
        [bigscience, "data", "tokenizer", "--input", str(data / "corpus.jsonl"), "--output", tokenizer]
        + ["--vocab-size", "512"]
    )
    prefix = str(data / "text_document")
    installed.run(
        [bigscience, "data", "preprocess", "--input", str(data / "corpus.jsonl"), "--output-prefix", prefix]
        + ["--tokenizer", tokenizer]
    )

    run_dir = tmp_path / "run"
    trained = installed.run(
        [
            bigscience,
            "train",
            "model=gpt_tiny",
            "train.iters=3",
            "train.micro_batch_size=2",
            "train.global_batch_size=8",
            "train.eval_interval=3",
            "train.eval_iters=1",
            "logging.log_interval=1",
            f"data.blend=[{prefix}]",
            f"data.tokenizer={tokenizer}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.split='90,9,1'",
            f"run_dir={run_dir}",
            "logging.tensorboard=false",
            "logging.progress=plain",
            "logging.carbon=false",
        ]
    )
    assert "at step 3" in trained.stdout
    step = run_dir / "checkpoints" / "step_0000003"

    installed.run(
        [
            bigscience,
            "eval",
            f"checkpoint={step}",
            "tasks=[stdlib_choice]",
            "limit=8",
            f"output={tmp_path / 'ours'}",
        ]
    )
    ours = json.loads((tmp_path / "ours" / "step_0000003" / "results.json").read_text())
    assert ours["n-samples"]["stdlib_choice"]["effective"] == 8

    # lm-eval's own CLI on the installed task folder, from yet another directory: the YAML finds its data.
    hf = tmp_path / "hf"
    installed.run([bigscience, "ckpt", "export-hf", str(step), str(hf)])
    tasks = installed.site / "evaluation" / "tasks"
    assert (tasks / "stdlib_choice.yaml").is_file() and (tasks / "stdlib_choice.json").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    installed.run(
        [installed.python, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32"]
        + ["--include_path", str(tasks), "--tasks", "stdlib_choice", "--limit", "8", "--device", "cpu"]
        + ["--batch_size", "8", "--output_path", "lm_eval_out"],
        cwd=elsewhere,
    )
    (results,) = (elsewhere / "lm_eval_out").rglob("results_*.json")
    theirs = json.loads(results.read_text())
    assert theirs["n-samples"]["stdlib_choice"]["effective"] == 8
    assert theirs["results"]["stdlib_choice"]["acc,none"] == ours["results"]["stdlib_choice"]["acc,none"]
