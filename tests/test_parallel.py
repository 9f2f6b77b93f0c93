"""Parallel layouts reproduce the single-process run (fp32, gloo, CPU)."""

import json
import shutil
import time

import pytest
import torch
from torch.autograd import Variable

from bigscience_train.checkpoint.reader import iter_model_tensors, resolve_checkpoint
from bigscience_train.parallel.comm_wait import CommWait
from tests.conftest import data_overrides, read_metrics, run_cli, run_script

COMMON = [
    "model=gpt_tiny",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.iters=10",
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


# (tp, pp, dp) layouts as the overrides and process counts a user gives. dp=2 with pp=2 halves the
# micro-batches per rank: micro batch 1 keeps them >= pp, as 1F1B needs.
LAYOUTS = {
    "(2,1,1)": (["parallel.tp=2"], 2),
    "(2,1,2)": (["parallel.tp=2"], 4),
    "(2,1,2)-zero3": (["parallel.tp=2", "parallel.dp_shard=zero3"], 4),
    "(1,2,1)-gpipe": (["parallel.pp=2", "parallel.pp_schedule=gpipe"], 2),
    "(1,2,1)-interleaved": (
        ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2"],
        2,
    ),
    "(2,2,1)": (["parallel.tp=2", "parallel.pp=2"], 4),
    "(1,2,2)": (["parallel.pp=2", "train.micro_batch_size=1"], 4),
    "(1,2,2)-zero2": (["parallel.pp=2", "train.micro_batch_size=1", "parallel.dp_shard=zero2"], 4),
    "(1,2,2)-zero3-interleaved": (
        [
            "parallel.pp=2",
            "train.micro_batch_size=1",
            "parallel.dp_shard=zero3",
            "parallel.pp_schedule=interleaved_1f1b",
            "parallel.virtual_stages=2",
        ],
        4,
    ),
    "(1,1,2)-zero1": (["parallel.dp_shard=zero1"], 2),
    "(2,1,2)-zero1": (["parallel.tp=2", "parallel.dp_shard=zero1"], 4),
    "(1,2,2)-zero1": (["parallel.pp=2", "train.micro_batch_size=1", "parallel.dp_shard=zero1"], 4),
    "(2,2,2)-zero1": (
        ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=1", "parallel.dp_shard=zero1"],
        8,
    ),
    "(2,1,1)-sp": (["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "(2,2,1)-sp": (["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"], 4),
}


# Each layout and each feature at least once, within the suite's time: (2,2,1) and (1,2,2) are also compared
# by the resume tests below (saved at (2,2,1), resumed at (1,2,2)-zero1); tp alone is a special case of tp
# composed with dp; FSDP over dp alone of FSDP composed with tp or pp (and test_train compares (1,1,2) with
# DDP); the interleaved schedule runs in (1,2,2)-zero3-interleaved, 1F1B in (2,2,1)-sp and the resumed
# (1,2,2)-zero1, GPipe in (1,2,1)-gpipe, sequence parallel in (2,2,1)-sp. (2,1,1), (2,1,1)-sp and
# (1,2,1)-interleaved are in LAYOUTS for runs by hand.
COMPARED = [
    "(1,2,1)-gpipe",
    "(2,1,2)",
    "(2,1,2)-zero3",
    "(1,2,2)-zero2",
    "(1,2,2)-zero3-interleaved",
    "(2,2,1)-sp",
    "(1,1,2)-zero1",
    "(2,1,2)-zero1",
    "(1,2,2)-zero1",
    "(2,2,2)-zero1",
]


@pytest.mark.parametrize("layout", COMPARED)
def test_parallel_layouts_match_single_process(tiny_data, tmp_path, single, layout):
    overrides, nproc = LAYOUTS[layout]
    run = tmp_path / "run"
    out = run_cli(["train", *COMMON, *overrides, *data_overrides(tiny_data, run)], nproc=nproc)
    assert out.returncode == 0, out.stderr
    tp, pp, dp = (int(n) for n in layout[1:6].split(","))
    assert f"(tp={tp} pp={pp} dp={dp})" in out.stdout
    assert_same_run(run, single)
    # Every layout of several ranks waits on some collective after backward (the loss totals at least).
    assert all(r["comm_wait"] > 0 for r in read_metrics(run))
    if pp > 1:
        record = read_metrics(run)[-1]
        micro = record["batch_size"] // ((1 if "train.micro_batch_size=1" in overrides else 2) * dp)
        virtual = 2 if "parallel.virtual_stages=2" in overrides else 1
        assert record["pp_bubble_theory"] == pytest.approx((pp - 1) / (virtual * micro + pp - 1))
        assert 0 <= record["pp_bubble"] < 1


def test_replicated_parameters_stay_identical_across_tp_ranks(tiny_data, tmp_path):
    out = run_script(
        "replica_check.py",
        2,
        [*COMMON, "parallel.tp=2", "precision=bf16", *data_overrides(tiny_data, tmp_path / "run")],
    )
    assert out.returncode == 0, out.stderr
    assert "replicas identical" in out.stdout


def test_flex_attention_under_tensor_parallel_gives_the_single_process_logits():
    out = run_script("flex_tp_check.py", 2, [])
    assert out.returncode == 0, out.stderr
    assert "flex tensor-parallel logits match" in out.stdout


def test_resume_with_two_data_parallel_ranks_is_bit_exact(tiny_data, tmp_path):
    """Also with async saves, which two ranks write and commit over a gloo group of their own."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    common = [*COMMON, "train.iters=8"]
    assert run_cli(["train", *common, *data_overrides(tiny_data, straight)], nproc=2).returncode == 0
    cut_run = [
        *common,
        "checkpoint.async_save=true",
        "checkpoint.interval=2",
        *data_overrides(tiny_data, cut),
    ]
    first = run_cli(["train", *cut_run, "train.exit_interval=5"], nproc=2)
    assert first.returncode == 0 and "stopped: exit_interval at step 5" in first.stdout, first.stderr
    assert sorted(p.name for p in (cut / "checkpoints").glob("step_*")) == [
        f"step_{s:07d}" for s in (2, 4, 5)
    ]
    second = run_cli(["train", *cut_run], nproc=2)
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr
    assert [r["loss"] for r in read_metrics(cut)] == [r["loss"] for r in read_metrics(straight)]
    ours, theirs = weights(cut), weights(straight)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.fixture(scope="module")
def saved_at_tp2_pp2(tiny_data, tmp_path_factory):
    """A run cut after 3 steps at (tp, pp, dp) = (2, 2, 1)."""
    run = tmp_path_factory.mktemp("tp2pp2") / "run"
    out = run_cli(
        ["train", *COMMON, *LAYOUTS["(2,2,1)"][0], "train.exit_interval=3", *data_overrides(tiny_data, run)],
        nproc=4,
    )
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="module")
def saved_at_zero1(tiny_data, tmp_path_factory):
    """A run cut after 3 steps at (tp, pp, dp) = (2, 1, 2) with ZeRO-1 (sharded optimizer states)."""
    run = tmp_path_factory.mktemp("zero1") / "run"
    out = run_cli(
        [
            "train",
            *COMMON,
            *LAYOUTS["(2,1,2)-zero1"][0],
            "train.exit_interval=3",
            *data_overrides(tiny_data, run),
        ],
        nproc=4,
    )
    assert out.returncode == 0, out.stderr
    return run


RESUMED_AT = {"(1,1,1)": ([], 1), "(1,1,4)": (["train.micro_batch_size=1"], 4), **LAYOUTS}


def resume_matches_single(tiny_data, tmp_path, single, saved, layout):
    overrides, nproc = RESUMED_AT[layout]
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    out = run_cli(["train", *COMMON, *overrides, *data_overrides(tiny_data, run)], nproc=nproc)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout
    assert_same_run(run, single)


# One process, FSDP with tp, and ZeRO-1 with pp; a wider dp is the ZeRO-1 checkpoint's test.
@pytest.mark.parametrize("layout", ["(1,1,1)", "(2,1,2)-zero3", "(1,2,2)-zero1"])
def test_checkpoint_saved_at_tp2_pp2_resumes_at_other_layouts(
    tiny_data, tmp_path, single, saved_at_tp2_pp2, layout
):
    resume_matches_single(tiny_data, tmp_path, single, saved_at_tp2_pp2, layout)


def test_zero1_checkpoint_resumes_at_another_layout_and_dp_size(tiny_data, tmp_path, single, saved_at_zero1):
    resume_matches_single(tiny_data, tmp_path, single, saved_at_zero1, "(1,1,4)")


def fault_run(tiny_data, run, layout, precision, fault, rank, steps, *extra):
    overrides, nproc = LAYOUTS[layout]
    out = run_script(
        "fault_check.py",
        nproc,
        [*COMMON, *overrides, f"precision={precision}", *extra, *data_overrides(tiny_data, run)],
        {"FAULT": fault, "FAULT_RANK": str(rank), "FAULT_STEPS": steps},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tiny_data, tmp_path):
    """At (1,2,2) the last rank is on the last pipeline stage and the second data-parallel replica, and its
    overflow is in the last stage's copy of the tied embedding, which the gradient norm does not count: only
    the mesh-wide overflow check can tell the other ranks."""
    report = fault_run(
        tiny_data, tmp_path / "run", "(1,2,2)", "fp16", "grad", 3, "3", "precision.hysteresis=1"
    )
    assert [r["skipped"] for r in report] == [[3]] * len(report)
    assert all(r["identical"] and r["error"] is None for r in report)
    scales = [r["loss_scale"] for r in read_metrics(tmp_path / "run")]
    assert scales[:3] == [2.0**12] * 3 and scales[3:] == [2.0**11] * 7
    assert read_metrics(tmp_path / "run")[-1]["skipped_steps"] == 1


def test_nan_loss_on_one_rank_skips_everywhere_then_stops_every_rank(tiny_data, tmp_path):
    report = fault_run(
        tiny_data, tmp_path / "run", "(2,2,1)", "fp32", "loss", 3, "2-", "train.max_consecutive_nonfinite=3"
    )
    assert [r["skipped"] for r in report] == [[2, 3, 4]] * 4
    assert all("3 consecutive steps had a non-finite loss" in r["error"] for r in report)


def test_fp16_overflows_at_the_minimum_loss_scale_stop_the_run(tiny_data, tmp_path):
    """Overflows from step 2 on: the scale halves 4 -> 2 -> 1 (steps 2 and 3 are the scaler's to cure), then
    two overflows at the minimum scale stop every rank instead of skipping to the end, and last_stop.json
    says why, so the chain ends."""
    run = tmp_path / "run"
    report = fault_run(
        tiny_data,
        run,
        "(2,1,1)",
        "fp16",
        "grad",
        1,
        "2-",
        "precision.hysteresis=1",
        "precision.initial_scale_power=2",
        "precision.min_scale_patience=2",
    )
    assert [r["skipped"] for r in report] == [[2, 3, 4, 5]] * 2
    message = "2 consecutive fp16 gradient overflows at the minimum loss scale 1"
    assert all(message in r["error"] and "last at step 5" in r["error"] for r in report)
    last = json.loads((run / "last_stop.json").read_text())
    assert last["reason"] == "loss_scale_floor" and last["step"] == 5 and message in last["error"]


def test_nan_loss_in_fp16_stops_like_in_other_precisions(tiny_data, tmp_path):
    report = fault_run(
        tiny_data, tmp_path / "run", "(2,1,1)", "fp16", "loss", 0, "2-", "train.max_consecutive_nonfinite=3"
    )
    assert [r["skipped"] for r in report] == [[2, 3, 4]] * 2
    assert all("3 consecutive steps had a non-finite loss" in r["error"] for r in report)
    assert json.loads((tmp_path / "run" / "last_stop.json").read_text())["reason"] == "nonfinite"


def test_more_ranks_than_gpus_on_a_node_is_a_clear_error(monkeypatch):
    from bigscience_train.parallel.env import rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert rank_device(0) == torch.device("cuda", 0)
    with pytest.raises(
        RuntimeError, match=r"local rank 1 has no GPU: this node shows 1 \(CUDA_VISIBLE_DEVICES=3\)"
    ):
        rank_device(1)


def test_comm_wait_counts_the_reductions_after_backward_not_backward_itself():
    """An FSDP-like callback queued during backward (the reductions' finish) is counted; slow computation
    in backward is not."""
    wait = CommWait(torch.device("cpu"))
    x = torch.ones(4, requires_grad=True)
    hidden = x * 2

    def slow_compute_then_queue_reductions(grad):
        time.sleep(1.0)
        Variable._execution_engine.queue_callback(lambda: time.sleep(0.2))
        return grad

    hidden.register_hook(slow_compute_then_queue_reductions)
    loss = hidden.sum()
    wait.time_backward_tail(loss)
    loss.backward()
    seconds = wait.take()
    assert 0.2 <= seconds < 1.0
    assert wait.take() == 0.0
