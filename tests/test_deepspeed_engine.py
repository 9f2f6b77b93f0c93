"""parallel.engine=deepspeed: DeepSpeed's engine (ZeRO-2 with the optimizer offloaded, ZeRO-3 with the
parameters offloaded) trains as our engine does (fp32, gloo, CPU, two processes, batch-size ramp-up and
clipping active), and checkpoints resume across the two engines."""

import importlib.util

import pytest
import torch

from bigscience_train.checkpoint.reader import iter_model_tensors, resolve_checkpoint
from bigscience_train.config import load_config
from bigscience_train.config.validate import ConfigError, validate
from tests.conftest import data_overrides, read_metrics, run_cli
from tests.test_parallel import COMMON as PARALLEL

# test_parallel's run (batch-size ramp-up and clipping active: DeepSpeed's accumulation, clipping and norm
# are checked too), shorter, with a checkpoint half-way.
COMMON = [o for o in PARALLEL if not o.startswith("train.iters=")] + [
    "train.iters=6",
    "checkpoint.interval=3",
]
ENGINES = {
    "zero2_offload_optimizer": ["parallel.dp_shard=zero2", "parallel.offload=optimizer"],
    # Every parameter partitioned, however small (gpt_tiny's are all under DeepSpeed's default threshold).
    "zero3_offload_params": [
        "parallel.dp_shard=zero3",
        "parallel.offload=params",
        "parallel.zero3_persistence_threshold=0",
    ],
}
DEEPSPEED = ["parallel.engine=deepspeed"]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="no deepspeed")


def train(tiny_data, run, *overrides, nproc=2):
    out = run_cli(["train", *COMMON, *overrides, *data_overrides(tiny_data, run)], nproc=nproc)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def records(run, key, kind="train"):
    return [r[key] for r in read_metrics(run, kind)]


def step_dir(run, step):
    return run / "checkpoints" / f"step_{step:07d}"


@pytest.fixture(scope="module")
def ours(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ours") / "run"
    train(tiny_data, run)
    return run


@pytest.fixture(scope="module")
def deepspeed_runs(tiny_data, tmp_path_factory):
    runs = {}
    for name, overrides in ENGINES.items():
        runs[name] = tmp_path_factory.mktemp(name) / "run"
        train(tiny_data, runs[name], *DEEPSPEED, *overrides)
    return runs


@needs_deepspeed
@pytest.mark.parametrize("name", list(ENGINES))
def test_deepspeed_engine_trains_as_ours(ours, deepspeed_runs, name):
    run = deepspeed_runs[name]
    # The ramp-up changes DeepSpeed's accumulation steps within the run.
    assert records(run, "batch_size") == records(ours, "batch_size")
    assert len(set(records(run, "batch_size"))) > 1
    for key in ("loss", "grad_norm", "lr"):
        assert records(run, key) == pytest.approx(records(ours, key), abs=1e-5), key
    assert records(run, "val_loss", "valid") == pytest.approx(records(ours, "val_loss", "valid"), abs=1e-5)
    theirs, mine = (dict(iter_model_tensors(resolve_checkpoint(r))) for r in (ours, run))
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.allclose(mine[key], theirs[key], atol=1e-5), key


@needs_deepspeed
def test_deepspeed_checkpoint_resumes_in_our_engine_on_one_process(tiny_data, tmp_path, ours, deepspeed_runs):
    run = tmp_path / "run"
    source = step_dir(deepspeed_runs["zero2_offload_optimizer"], 3)
    out = train(tiny_data, run, f"train.load={source}", nproc=1)
    assert "resumed from" in out.stdout
    assert records(run, "loss") == pytest.approx(records(ours, "loss")[3:], abs=1e-5)
    assert records(run, "grad_norm") == pytest.approx(records(ours, "grad_norm")[3:], abs=1e-5)


@needs_deepspeed
def test_our_checkpoint_resumes_in_deepspeed(tiny_data, tmp_path, ours):
    """ZeRO-2, whose optimizer state DeepSpeed links to the parameters only after a step. ZeRO-3 with offloaded
    parameters resumed ours the same way by hand, but one such run of four aborted at exit in a DeepSpeed
    thread ('terminate called without an active exception'): not in the suite until that is understood."""
    run = tmp_path / "run"
    zero2 = ENGINES["zero2_offload_optimizer"]
    out = train(tiny_data, run, *DEEPSPEED, *zero2, f"train.load={step_dir(ours, 3)}")
    assert "resumed from" in out.stdout
    assert records(run, "loss") == pytest.approx(records(ours, "loss")[3:], abs=1e-5)
    assert records(run, "grad_norm") == pytest.approx(records(ours, "grad_norm")[3:], abs=1e-5)


def problems(*overrides, world_size=2):
    with pytest.raises(ConfigError) as e:
        validate(load_config(["model=gpt_tiny", "train.iters=1", *overrides]), world_size=world_size)
    return e.value.problems


def test_deepspeed_engine_rules_are_listed_together():
    found = problems(*DEEPSPEED, "parallel.tp=2", "parallel.pp=2", "parallel.offload=optimizer", world_size=4)
    assert any("parallel.tp=2 must be 1" in p for p in found)
    assert any("parallel.pp=2 must be 1" in p for p in found)
    assert any("parallel.offload=optimizer needs a ZeRO stage" in p for p in found)
    assert any(
        "parallel.offload=params needs parallel.dp_shard=zero3, got zero2" in p
        for p in problems(*DEEPSPEED, "parallel.dp_shard=zero2", "parallel.offload=params")
    )
    assert any("needs parallel.engine=deepspeed" in p for p in problems("parallel.offload=optimizer"))


def test_deepspeed_engine_without_the_package_names_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    found = problems(*DEEPSPEED, "parallel.dp_shard=zero1")
    assert found == [
        "parallel.engine=deepspeed needs the deepspeed package: pip install 'bigscience-train[deepspeed]'"
    ]
