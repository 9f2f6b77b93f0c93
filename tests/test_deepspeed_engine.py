"""parallel.engine=deepspeed: DeepSpeed's engine (ZeRO-2 with the optimizer offloaded, ZeRO-3 with the
parameters offloaded, ZeRO-1 in bf16) trains as our engine does (fp32 and bf16, gloo, CPU, two processes,
batch-size ramp-up and clipping active), checkpoints resume across the two engines, and ZeRO-3 builds the
model one parameter at a time."""

import importlib.util
import json
import resource
import subprocess
import sys

import pytest
import torch

from bigscience_train.checkpoint.reader import iter_model_tensors, resolve_checkpoint
from bigscience_train.config import load_config
from bigscience_train.config.validate import ConfigError, validate
from tests.conftest import ROOT, child_env, data_overrides, read_metrics, run_cli
from tests.test_parallel import COMMON as PARALLEL

# test_parallel's run (batch-size ramp-up and clipping active: DeepSpeed's accumulation, clipping and norm
# are checked too), shorter, with a checkpoint half-way.
COMMON = [o for o in PARALLEL if not o.startswith("train.iters=")] + [
    "train.iters=6",
    "checkpoint.interval=3",
]
ENGINES = {
    "zero1": ["parallel.dp_shard=zero1"],
    "zero2_offload_optimizer": ["parallel.dp_shard=zero2", "parallel.offload=optimizer"],
    # Every parameter partitioned, however small (gpt_tiny's are all under DeepSpeed's default threshold).
    "zero3_offload_params": [
        "parallel.dp_shard=zero3",
        "parallel.offload=params",
        "parallel.zero3_persistence_threshold=0",
    ],
    # DeepSpeed's ZeRO optimizer on a bf16 copy of the module, its gradients reduced in bf16 over gloo.
    "zero1_bf16": ["parallel.dp_shard=zero1", "precision=bf16"],
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
def ours_bf16(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ours_bf16") / "run"
    train(tiny_data, run, "precision=bf16")
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
def test_deepspeed_engine_trains_as_ours(request, deepspeed_runs, name):
    """In fp32 to 1e-5. In bf16 DeepSpeed rounds the weights and the gradients to bf16 where our engine rounds
    autocast's matmul inputs: bf16 itself (our engine in bf16 against fp32) moves these 6 steps' losses by
    1.5e-4 and gradient norms by 1e-3 relative, so the engines' losses are held to 1e-3 and their norms to
    5e-3 relative (they differ by 1e-4 and 4e-4), far below what a wrong accumulation, reduction or scale
    changes. Their weights are not compared in bf16: Adam's normalised step turns rounding-level gradient
    differences into up to a whole LR step of a weight."""
    run = deepspeed_runs[name]
    bf16 = "precision=bf16" in ENGINES[name]
    ours = request.getfixturevalue("ours_bf16" if bf16 else "ours")
    # The ramp-up changes DeepSpeed's accumulation steps within the run.
    assert records(run, "batch_size") == records(ours, "batch_size")
    assert len(set(records(run, "batch_size"))) > 1
    loss = pytest.approx(records(ours, "loss"), abs=1e-3 if bf16 else 1e-5)
    assert records(run, "loss") == loss
    norm = pytest.approx(records(ours, "grad_norm"), **({"rel": 5e-3} if bf16 else {"abs": 1e-5}))
    assert records(run, "grad_norm") == norm
    assert records(run, "lr") == pytest.approx(records(ours, "lr"), abs=1e-5)
    val_loss = pytest.approx(records(ours, "val_loss", "valid"), abs=1e-3 if bf16 else 1e-5)
    assert records(run, "val_loss", "valid") == val_loss
    theirs, mine = (dict(iter_model_tensors(resolve_checkpoint(r))) for r in (ours, run))
    assert mine.keys() == theirs.keys()
    for key in mine:
        # DeepSpeed's fp32 masters, as our engine keeps fp32 weights.
        assert mine[key].dtype == torch.float32, key
        assert bf16 or torch.allclose(mine[key], theirs[key], atol=1e-5), key


@needs_deepspeed
def test_deepspeed_checkpoint_resumes_in_our_engine_on_one_process(tiny_data, tmp_path, ours, deepspeed_runs):
    run = tmp_path / "run"
    source = step_dir(deepspeed_runs["zero2_offload_optimizer"], 3)
    out = train(tiny_data, run, f"train.load={source}", nproc=1)
    assert "resumed from" in out.stdout
    assert records(run, "loss") == pytest.approx(records(ours, "loss")[3:], abs=1e-5)
    assert records(run, "grad_norm") == pytest.approx(records(ours, "grad_norm")[3:], abs=1e-5)


@needs_deepspeed
@pytest.mark.parametrize("engine", ["zero2_offload_optimizer", "zero3_offload_params"])
def test_our_checkpoint_resumes_in_deepspeed(tiny_data, tmp_path, ours, engine):
    """ZeRO-2, whose optimizer state DeepSpeed links to the parameters only after a step, and ZeRO-3 with
    offloaded parameters, whose forward weights are refreshed after the load (the fine-tuning case). One
    ZeRO-3 run by hand once aborted at exit ('terminate called without an active exception'); 32 runs since,
    on an idle and a loaded machine, exited cleanly."""
    run = tmp_path / "run"
    out = train(tiny_data, run, *DEEPSPEED, *ENGINES[engine], f"train.load={step_dir(ours, 3)}")
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


# 8 layers of hidden size 512: 25M parameters (100 MiB in fp32), none over 1M elements.
BUILD_MODEL = ["model=gpt_tiny", "model.num_layers=8", "model.hidden_size=512", "model.num_heads=8"]
MIB = 2**20


def zero3_build_report(dp: int, rank: int) -> None:
    """Run in a fresh process by the test below: builds rank `rank` of `dp` (a fake process group: nothing
    moves, as every rank draws the same values) with the ZeRO-3 build of the engine, and prints as JSON how
    much the process's peak resident memory grew during it, the bytes of the rank's partitions and the whole
    model's bytes, and its largest parameter's."""
    from bigscience_train.dryrun.fake_rank import init_fake_rank
    from bigscience_train.parallel.deepspeed_engine import build_module, deepspeed_config, init_deepspeed
    from bigscience_train.parallel.dims import ParallelDims
    from bigscience_train.train.loop import build_optimizer

    cfg = load_config([*BUILD_MODEL, *DEEPSPEED, *ENGINES["zero3_offload_params"], f"parallel.dp={dp}"])
    dims = ParallelDims(dp=dp, dp_shard="zero3")
    penv = init_fake_rank(dims, rank)
    zero_init = init_deepspeed("cpu").zero.Init(config_dict_or_path=deepspeed_config(cfg, dp, "cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    module, _ = build_module(cfg, dims.model_shape(cfg.model), penv, zero_init, build_optimizer)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    params = list({id(p): p for p in module.parameters()}.values())
    report = {
        "grown": grown,
        "held": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
        "whole": sum(p.ds_numel * p.element_size() for p in params),
        "largest": max(p.ds_numel * p.element_size() for p in params),
    }
    print(json.dumps(report))


@needs_deepspeed
def test_zero3_build_holds_its_partitions_and_one_whole_parameter():
    """The whole model never exists on a rank: its peak memory grows by its partitions and about one whole
    parameter (the one being drawn), not by the whole model the full build held first. glibc returns every
    allocation over 64 KiB to the system when freed (its threshold fixed), so the peak resident memory is the
    peak allocated, not the allocator's fragmentation."""
    dp, rank = 8, 7
    code = f"from tests.test_deepspeed_engine import zero3_build_report; zero3_build_report({dp}, {rank})"
    # zero.Init reads the local rank from the launcher's environment.
    env = child_env({"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "LOCAL_RANK": "0"})
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["whole"] > 90 * MIB
    assert report["held"] == pytest.approx(report["whole"] / dp, rel=0.01)
    # The parameter being drawn and the block of values it is drawn from (model/init.py), at most as large.
    assert report["grown"] <= report["held"] + 2 * report["largest"] + 16 * MIB, report
    assert report["grown"] < report["whole"] / 3, report
