"""The layers below the trainer stay light: Slurm orchestration, the planner, the report, the config system
and the command line import neither torch nor megatron, and the config-only commands run without them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, child_env, data_overrides

HEAVY = ("torch", "megatron")
LIGHT_PACKAGES = ("slurm", "plan", "report", "config")


def light_modules() -> list[str]:
    names = ["bigscience_train.cli"]
    for package in LIGHT_PACKAGES:
        for path in sorted((ROOT / "bigscience_train" / package).glob("*.py")):
            suffix = "" if path.stem == "__init__" else f".{path.stem}"
            names.append(f"bigscience_train.{package}{suffix}")
    return names


def heavy_modules_after(code: str) -> list[str]:
    """The torch and megatron modules a fresh interpreter holds after running `code`."""
    report = f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    probe = f"{code}\nimport json, sys\n{report}"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", light_modules())
def test_module_imports_neither_torch_nor_megatron(module):
    assert heavy_modules_after(f"import {module}") == []


def fake_run(run_dir: Path) -> Path:
    """A run directory with two logged steps, all `report` and `slurm status` read."""
    run_dir.mkdir(parents=True)
    fields = {"lr": 1e-3, "batch_size": 8, "tokens_per_s": 100.0, "mfu": 0.1, "grad_norm": 1.0}
    records = [
        {"kind": "train", "step": step, "consumed_tokens": 512 * step, "loss": 6.0 / step, **fields}
        for step in (1, 2)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_config_only_commands_run_without_torch(tiny_data, tmp_path):
    run = fake_run(tmp_path / "logged")
    render = ["slurm", "render", *data_overrides(tiny_data, tmp_path / "rendered"), "train.iters=2"]
    for argv in (["plan"], render, ["slurm", "status", str(run)], ["report", str(run)]):
        code = f"from bigscience_train.cli import main\nassert main({argv!r}) in (0, 1)"
        assert heavy_modules_after(code) == [], argv


def loaded_after(code: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules under `prefixes` a fresh interpreter holds after running `code`."""
    report = f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))"
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\n{report}"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def package_imports(package: str) -> str:
    return "\n".join(
        f"import bigscience_train.{package}.{path.stem}"
        for path in sorted((ROOT / "bigscience_train" / package).glob("*.py"))
        if path.stem not in ("__init__", "__main__")
    )


@pytest.mark.parametrize(
    "package, forbidden",
    [
        # The model knows nothing of ranks, configs or training.
        ("model", ("bigscience_train.config", "bigscience_train.parallel", "bigscience_train.train")),
        # Training does not import evaluation: in-training tasks are a hook the entry point attaches.
        ("train", ("evaluation",)),
        # Checkpoints read and write state dicts of any layout without the parallel layer.
        ("checkpoint", ("bigscience_train.parallel", "bigscience_train.train", "evaluation")),
        # ParallelDims is the layout arithmetic the planner and Slurm side share; only build_mesh needs torch.
        ("parallel.dims", ("torch", "megatron")),
    ],
)
def test_layers_import_downward_only(package, forbidden):
    code = package_imports(package) if "." not in package else f"import bigscience_train.{package}"
    assert loaded_after(code, forbidden) == []


def test_the_data_pipeline_loads_megatron_datasets_without_megatrons_training_stack():
    """Every rank imports the datasets; megatron/core/__init__.py would add its whole training stack (and
    wandb, and torch's compiler) to each. The package stays whole for code that asks for more of it."""
    loaded = loaded_after("import bigscience_train.data.gpt_data", ("megatron", "wandb", "torch._inductor"))
    assert "megatron.core.datasets.gpt_dataset" in loaded
    assert [
        m for m in loaded if m.startswith(("megatron.core.tensor_parallel", "wandb", "torch._inductor"))
    ] == []
    whole = loaded_after(
        "import bigscience_train.data.gpt_data\nimport megatron.core\n"
        "from megatron.core import DistributedDataParallel\nassert megatron.core.mpu.get_data_parallel_rank",
        ("megatron.core.tensor_parallel",),
    )
    assert whole
