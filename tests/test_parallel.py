"""Parallel layouts reproduce the single-process run (fp32, gloo, CPU)."""

import shutil
import subprocess
import sys

import pytest
import torch

from bigscience_train.checkpoint.reader import iter_model_tensors, resolve_checkpoint
from tests.conftest import ROOT, data_overrides, read_metrics, run_cli

COMMON = [
    "model=gpt_tiny",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.iters=6",
    "train.eval_interval=3",
    "train.eval_iters=2",
    "logging.log_interval=1",
    "optim.lr=3e-3",
    "optim.warmup_samples=8",
    "train.rampup_batch_size=[4,4,16]",
    # Clipping active (gradient norms here are 0.6-0.9), so the mesh-wide gradient norm is checked too.
    "optim.clip_grad=0.5",
]


@pytest.fixture(scope="module")
def single(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    out = run_cli(["train", *COMMON, *data_overrides(tiny_data, run)])
    assert out.returncode == 0, out.stderr
    return run


def weights(run):
    return dict(iter_model_tensors(resolve_checkpoint(run)))


def assert_same_run(run, reference):
    assert [r["loss"] for r in read_metrics(run)] == pytest.approx(
        [r["loss"] for r in read_metrics(reference)], abs=1e-5
    )
    assert [r["grad_norm"] for r in read_metrics(run)] == pytest.approx(
        [r["grad_norm"] for r in read_metrics(reference)], abs=1e-5
    )
    assert [r["val_loss"] for r in read_metrics(run, "valid")] == pytest.approx(
        [r["val_loss"] for r in read_metrics(reference, "valid")], abs=1e-5
    )
    ours, theirs = weights(run), weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5), name


@pytest.mark.parametrize(
    "tp, dp, zero", [(2, 1, "none"), (2, 2, "none"), (1, 2, "zero2"), (1, 2, "zero3"), (2, 2, "zero3")]
)
def test_parallel_layouts_match_single_process(tiny_data, tmp_path, single, tp, dp, zero):
    run = tmp_path / "run"
    overrides = [f"parallel.tp={tp}", f"parallel.dp_shard={zero}"]
    out = run_cli(["train", *COMMON, *overrides, *data_overrides(tiny_data, run)], nproc=tp * dp)
    assert out.returncode == 0, out.stderr
    assert f"(tp={tp} pp=1 dp={dp})" in out.stdout
    assert_same_run(run, single)


def test_replicated_parameters_stay_identical_across_tp_ranks(tiny_data, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "replica_check.py"),
        *COMMON,
        "parallel.tp=2",
        "precision=bf16",
        *data_overrides(tiny_data, tmp_path / "run"),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "replicas identical" in out.stdout


def test_checkpoint_saved_with_tp2_resumes_at_tp1(tiny_data, tmp_path, single):
    run = tmp_path / "run"
    first = run_cli(
        ["train", *COMMON, "parallel.tp=2", "train.exit_interval=3", *data_overrides(tiny_data, run)], nproc=2
    )
    assert first.returncode == 0, first.stderr
    second = run_cli(["train", *COMMON, *data_overrides(tiny_data, run)])
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    assert_same_run(run, single)


def test_resume_with_two_data_parallel_ranks_is_bit_exact(tiny_data, tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    common = [*COMMON, "train.iters=8"]
    assert run_cli(["train", *common, *data_overrides(tiny_data, straight)], nproc=2).returncode == 0
    first = run_cli(["train", *common, "train.exit_interval=4", *data_overrides(tiny_data, cut)], nproc=2)
    assert first.returncode == 0 and "stopped: exit_interval at step 4" in first.stdout, first.stderr
    second = run_cli(["train", *common, *data_overrides(tiny_data, cut)], nproc=2)
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr
    assert [r["loss"] for r in read_metrics(cut)] == [r["loss"] for r in read_metrics(straight)]
    ours, theirs = weights(cut), weights(straight)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.fixture(scope="module")
def saved_at_tp2_dp2(tiny_data, tmp_path_factory):
    """A run cut after 3 steps at (tp, pp, dp) = (2, 1, 2)."""
    run = tmp_path_factory.mktemp("tp2dp2") / "run"
    out = run_cli(
        ["train", *COMMON, "parallel.tp=2", "train.exit_interval=3", *data_overrides(tiny_data, run)], nproc=4
    )
    assert out.returncode == 0, out.stderr
    return run


@pytest.mark.parametrize(
    "resume_at, nproc",
    [
        (["parallel.tp=1"], 1),
        (["parallel.tp=1", "train.micro_batch_size=1"], 4),
        (["parallel.tp=2"], 2),
        (["parallel.tp=2", "parallel.dp_shard=zero3"], 4),
    ],
    ids=["(1,1,1)", "(1,1,4)", "(2,1,1)", "(2,1,2)-zero3"],
)
def test_checkpoint_saved_at_tp2_dp2_resumes_at_other_layouts(
    tiny_data, tmp_path, single, saved_at_tp2_dp2, resume_at, nproc
):
    run = tmp_path / "run"
    shutil.copytree(saved_at_tp2_dp2, run)
    out = run_cli(["train", *COMMON, *resume_at, *data_overrides(tiny_data, run)], nproc=nproc)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout
    assert_same_run(run, single)
