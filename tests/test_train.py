import json
import math
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bigscience_train.checkpoint.dcp import step_dir_name
from bigscience_train.config import load_config, validate
from bigscience_train.metrics.flops import PEAK_TFLOPS, datasheet_peak_flops, flops_per_iteration
from bigscience_train.metrics.peak import datasheet_name, device_peak_flops
from bigscience_train.model import gpt
from bigscience_train.model.gpt import GPT
from bigscience_train.model.shape import GPTShape
from bigscience_train.parallel import build
from bigscience_train.parallel.env import init_parallel
from bigscience_train.train.loop import NonFiniteLossError, Trainer
from bigscience_train.train.precision import DynamicLossScaler
from tests.conftest import ROOT, child_env, data_overrides, read_metrics, run_cli, run_script, torchrun

FAST = [
    "model=gpt_tiny",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.eval_interval=10",
    "train.eval_iters=2",
    "logging.log_interval=1",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.warmup_samples=16",
    "checkpoint.interval=1000",
]


def train(tiny_data, run_dir, *overrides, hooks=()):
    cfg = load_config([*FAST, *data_overrides(tiny_data, run_dir), *overrides])
    validate(cfg, world_size=1, check_files=True)
    return Trainer(cfg, init_parallel(), hooks).run()


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)]


def test_short_run_loss_falls_and_writes_run_directory(tiny_data, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_data, run, "train.iters=40", "logging.tensorboard=true")
    assert result.stop_reason == "iters" and result.state.step == 40
    assert result.last_val_loss < result.first_val_loss - 0.7
    records = read_metrics(run)
    assert len(records) == 40
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "batch_size",
        "consumed_samples",
        "consumed_tokens",
        "step_time",
        "tokens_per_s",
        "tflops_per_device",
        "mfu",
    ):
        assert key in records[-1]
    assert records[-1]["consumed_tokens"] == 40 * 8 * 64
    assert 0 < records[-1]["mfu"] < 1.5
    assert (run / "config.yaml").is_file() and list((run / "tensorboard").iterdir())
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000040"
    meta = json.loads((run / "checkpoints" / "step_0000040" / "meta.json").read_text())
    assert meta["step"] == 40 and meta["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert any(name.endswith(".distcp") for name in meta["shards"])


def test_same_seed_gives_bit_identical_losses(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "a", "train.iters=6")
    train(tiny_data, tmp_path / "b", "train.iters=6")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    train(tiny_data, tmp_path / "c", "train.iters=6", "train.seed=7")
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_rampup_and_token_limit(tiny_data, tmp_path):
    result = train(
        tiny_data,
        tmp_path / "r",
        "train.iters=null",
        f"train.tokens={64 * 8 * 6}",
        "train.rampup_batch_size=[4,2,16]",
    )
    sizes = [r["batch_size"] for r in read_metrics(tmp_path / "r")]
    assert sizes[:3] == [4, 4, 6] and sizes[-1] == 8
    assert result.stop_reason == "tokens" and result.state.consumed_tokens >= 64 * 8 * 6


def test_two_data_parallel_processes_match_one(tiny_data, tmp_path):
    common = [*FAST, "train.iters=8", "train.rampup_batch_size=[4,4,16]"]
    single = run_cli(["train", *common, *data_overrides(tiny_data, tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    double = run_cli(["train", *common, *data_overrides(tiny_data, tmp_path / "two")], nproc=2)
    assert double.returncode == 0, double.stderr
    assert "dp=2" in double.stdout
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


def test_resume_continues_exactly(tiny_data, tmp_path):
    common = [*FAST, "train.rampup_batch_size=[4,4,32]"]
    straight = run_cli(
        ["train", *common, "train.iters=12", *data_overrides(tiny_data, tmp_path / "straight")]
    )
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "resumed"
    first = run_cli(
        ["train", *common, "train.iters=12", "train.exit_interval=6", *data_overrides(tiny_data, run)]
    )
    assert first.returncode == 0, first.stderr
    assert "stopped: exit_interval at step 6" in first.stdout
    second = run_cli(["train", *common, "train.iters=12", *data_overrides(tiny_data, run)])
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    assert losses(run) == losses(tmp_path / "straight")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's refusal")
def test_flex_attention_is_refused_for_training_on_cpu(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="model.attention=flex trains on GPUs only"):
        train(tiny_data, tmp_path / "run", "train.iters=2", "model.attention=flex")


def test_incomplete_checkpoint_is_ignored(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_data, run, "train.iters=3")
    broken = run / "checkpoints" / ".tmp_step_0000005"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"partial")
    result = train(tiny_data, run, "train.iters=4")
    assert result.state.step == 4 and not broken.exists()


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_leaves_the_math_unchanged(tiny_data, tmp_path, mode):
    train(tiny_data, tmp_path / "none", "train.iters=4")
    result = train(tiny_data, tmp_path / mode, "train.iters=4", f"parallel.recompute={mode}")
    assert losses(tmp_path / mode) == pytest.approx(losses(tmp_path / "none"), abs=1e-6)
    saved = result.checkpoint / "meta.json"
    assert json.loads(saved.read_text())["parameters"] == 232_960


def test_exit_duration_stops_and_saves(tiny_data, tmp_path):
    result = train(tiny_data, tmp_path / "t", "train.iters=1000", "train.exit_duration_minutes=0.05")
    assert result.stop_reason == "exit_duration" and result.state.step < 1000
    assert result.checkpoint.name == step_dir_name(result.state.step)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_trains(tiny_data, tmp_path, dtype):
    result = train(
        tiny_data, tmp_path / dtype, "train.iters=12", "train.eval_interval=12", f"precision={dtype}"
    )
    assert math.isfinite(result.last_val_loss) and result.last_val_loss < result.first_val_loss
    if dtype == "fp16":
        assert read_metrics(tmp_path / dtype)[-1]["loss_scale"] == 2.0**12


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_losses_are_skipped_then_stop(tiny_data, tmp_path, monkeypatch, fused):
    # The loss comes from the fused output layer, or from logits.
    module, name = (gpt, "output_layer_loss") if fused else (build, "masked_lm_loss_sum")
    real = getattr(module, name)
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss, count = real(*args)
        return (loss * float("nan"), count) if calls["n"] > 4 * 3 else (loss, count)

    monkeypatch.setattr(module, name, poisoned)
    with pytest.raises(NonFiniteLossError, match="5 consecutive steps"):
        train(
            tiny_data,
            tmp_path / "nan",
            "train.iters=50",
            "train.eval_iters=0",
            f"train.fused_output_loss={fused}",
        )
    records = read_metrics(tmp_path / "nan")
    assert records[-1]["skipped_steps"] >= 4


def test_dynamic_loss_scaler_hysteresis_and_growth():
    s = DynamicLossScaler(scale=2.0**12, window=3, hysteresis=2, min_scale=1.0)
    s.update(True)
    assert s.scale == 2.0**12  # first overflow absorbed by hysteresis
    s.update(True)
    assert s.scale == 2.0**11
    for _ in range(3):
        s.update(False)
    assert s.scale == 2.0**12
    s.update(True)
    assert s.scale == 2.0**12 and s.hysteresis_tracker == 1


def test_megatron_flops_formula():
    # GPT-3 175B in the Megatron paper: 96 layers, h 12288, s 2048, V 51200. With full recompute its eq. 3;
    # without, Megatron-LM's count (the output layer is not recomputed).
    b, s, layers, h, v = 1, 2048, 96, 12288, 51200
    base = b * s * layers * h**2
    recomputed = 96 * base * (1 + s / (6 * h) + v / (16 * layers * h))
    assert flops_per_iteration(b, s, layers, h, v, recompute=True) == pytest.approx(recomputed)
    assert flops_per_iteration(b, s, layers, h, v) == pytest.approx(
        72 * base * (1 + s / (6 * h) + v / (12 * layers * h))
    )


def test_flops_formula_counts_the_models_matmuls():
    # torch's FLOP counter sees every matmul of a forward and backward (the output layer's too) but not
    # CPU attention: the formula's attention term, 12·B·s²·l·h, is added by hand.
    shape = GPTShape(
        num_layers=2, hidden_size=64, num_heads=4, seq_length=32, vocab_size=256, position="learned"
    )
    model = GPT(shape)
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (2, 32))).sum().backward()
    attention = 12 * 2 * 32**2 * 2 * 64
    assert counter.get_total_flops() + attention == flops_per_iteration(2, 32, 2, 64, 256)


def test_mfu_peak_follows_the_device_the_rank_runs_on(tiny_data, tmp_path):
    """A CUDA device's name maps to the data sheet; a CPU (or an unlisted GPU) takes a measured matmul, whatever
    cluster.device says (an A100 preset's peak would put a CPU's MFU near zero)."""
    train(tiny_data, tmp_path / "run", "train.iters=2", "cluster=jean_zay_a100", "logging.carbon=false")
    assert read_metrics(tmp_path / "run")[-1]["mfu"] > 0.01
    assert datasheet_peak_flops("a100", "bf16") == 312e12 and PEAK_TFLOPS["v100"]["fp16"] == 125.0
    with pytest.raises(ValueError, match="no bf16 support"):
        datasheet_peak_flops("v100", "bf16")
    names = [
        "NVIDIA H100 80GB HBM3",
        "Tesla V100-SXM2-32GB",
        "NVIDIA A100-SXM4-80GB",
        "NVIDIA H200",
        "NVIDIA L4",
    ]
    assert [datasheet_name(n) for n in names] == ["h100", "v100", "a100", "h200", None]
    measured = device_peak_flops(torch.device("cpu"), "fp32")
    assert 1e9 < measured < 1e14


def test_tokenizer_bigger_than_model_vocab_is_an_error(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="has 512 tokens but model.vocab_size=100"):
        train(tiny_data, tmp_path / "v", "train.iters=1", "model.vocab_size=100")
    assert torch.get_num_threads() >= 1


def _when_training_starts(run_dir, action):
    """Runs `action` from another thread once the first training step is logged."""

    def watch():
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_stop_signal_checkpoints_at_the_step_boundary_and_resume_is_exact(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "straight", "train.iters=40")
    run = tmp_path / "cut"
    _when_training_starts(run, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    cut = train(tiny_data, run, "train.iters=40")
    assert cut.stop_reason == "signal" and 0 < cut.state.step < 40
    assert cut.checkpoint.name == step_dir_name(cut.state.step)
    last = json.loads((run / "last_stop.json").read_text())
    assert last == {**last, "reason": "signal", "finished": False, "step": cut.state.step}
    done = train(tiny_data, run, "train.iters=40")
    assert done.stop_reason == "iters"
    assert losses(run) == losses(tmp_path / "straight")
    assert json.loads((run / "last_stop.json").read_text())["finished"] is True


def test_kill_switch_stops_cleanly_and_keeps_stopping(tiny_data, tmp_path):
    run = tmp_path / "k"
    switch = tmp_path / "STOP"
    _when_training_starts(run, switch.touch)
    result = train(tiny_data, run, "train.iters=1000", f"train.kill_switch={switch}")
    assert result.stop_reason == "kill_switch" and result.checkpoint.name == step_dir_name(result.state.step)
    again = train(tiny_data, run, "train.iters=1000", f"train.kill_switch={switch}")
    assert again.stop_reason == "kill_switch" and again.state.step == result.state.step


def test_async_save_trains_identically_and_commits_every_checkpoint(tiny_data, tmp_path):
    sync = train(tiny_data, tmp_path / "sync", "train.iters=6", "checkpoint.interval=2")
    run = tmp_path / "async"
    result = train(tiny_data, run, "train.iters=6", "checkpoint.interval=2", "checkpoint.async_save=true")
    assert losses(run) == losses(tmp_path / "sync")
    assert result.checkpoint == run / "checkpoints" / step_dir_name(6)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest",
        *(step_dir_name(s) for s in (2, 4, 6)),
    ]
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["async"] is True and meta["checksums"]
    resumed = train(tiny_data, run, "train.iters=8", "checkpoint.interval=2", "checkpoint.async_save=true")
    assert resumed.state.step == 8 and sync.state.step == 6


def test_rollback_moves_later_checkpoints_aside_and_resumes_from_the_step(tiny_data, tmp_path):
    """Without --skip-data the run continues from step 4 as it did the first time."""
    from bigscience_train.cli import main

    run = tmp_path / "run"
    train(tiny_data, run, "train.iters=8", "checkpoint.interval=2")
    first = {r["step"]: r["loss"] for r in read_metrics(run)}
    assert main(["ckpt", "rollback", str(run), "--to", "4"]) == 0
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == step_dir_name(4)
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [step_dir_name(2), step_dir_name(4)]
    aside = sorted(p.name for p in checkpoints.glob("rolled_back/*/step_*"))
    assert aside == [step_dir_name(6), step_dir_name(8)]
    result = train(tiny_data, run, "train.iters=8", "checkpoint.interval=2")
    assert result.state.step == 8
    again = [r for r in read_metrics(run) if r["step"] > 4][-4:]
    assert [r["step"] for r in again] == [5, 6, 7, 8]
    assert [r["loss"] for r in again] == [first[s] for s in (5, 6, 7, 8)]
    log = [json.loads(line) for line in (run / "rollbacks.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log] == ["rollback requested", "rollback applied"]
    assert not (checkpoints / "rollback.json").exists()


def test_rollback_with_skip_data_and_lr_scale_continues_past_the_skipped_batches(tiny_data, tmp_path, capsys):
    from bigscience_train.cli import main

    straight, run = tmp_path / "straight", tmp_path / "run"
    train(tiny_data, straight, "train.iters=12")
    train(tiny_data, run, "train.iters=8", "checkpoint.interval=4")
    assert main(["ckpt", "rollback", str(run), "--to", "4", "--skip-data", "--lr-scale", "0.5"]) == 0
    train(tiny_data, run, "train.iters=12", "checkpoint.interval=4")
    reference = {r["step"]: r for r in read_metrics(straight)}
    records = read_metrics(run)
    resumed = [r for r in records if r["step"] > 8]
    # Steps 9-12 read the batches of the straight run's steps 9-12, at half its learning rate.
    assert [r["step"] for r in resumed] == [9, 10, 11, 12]
    for r in resumed:
        assert r["consumed_samples"] == reference[r["step"]]["consumed_samples"]
        assert r["lr"] == pytest.approx(0.5 * reference[r["step"]]["lr"])
    rollback = read_metrics(run, "rollback")
    assert len(rollback) == 1 and rollback[0]["to_step"] == 4
    assert (
        rollback[0]["skipped_samples"] == reference[8]["consumed_samples"] - reference[4]["consumed_samples"]
    )
    assert main(["ckpt", "rollback", str(run), "--to", "5"]) == 2
    assert "has no complete checkpoint of step 5 (complete: 4, 12)" in capsys.readouterr().err


def test_a_loss_above_the_factor_times_the_running_median_is_logged_as_a_spike(tiny_data, tmp_path, capsys):
    cfg = load_config([*FAST, *data_overrides(tiny_data, tmp_path / "run"), "logging.spike_window=20"])
    trainer = Trainer(cfg, init_parallel())
    logged = []
    trainer.writer = type("Writer", (), {"log": lambda self, record: logged.append(record)})()
    for step, loss in enumerate([3.0, 3.2, 2.9] * 5 + [7.0, 3.1, float("nan")], start=1):
        trainer.state.step = step
        trainer._watch_for_spike(loss)
    assert [(r["kind"], r["step"]) for r in logged] == [("spike", 16)]
    assert logged[0]["median"] == 3.0 and logged[0]["ratio"] == pytest.approx(7.0 / 3.0)
    assert "loss spike at step 16: 7.0000 is 2.33x the median 3.0000" in capsys.readouterr().out


def test_a_slow_rank_is_named_as_a_straggler_and_each_step_is_broken_down(tiny_data, tmp_path):
    """Two data-parallel ranks, the second sleeping 1.5 s at the end of every backward: the first waits for it
    (communication wait), the second is busy; the report names the second, on this node. The median of two
    ranks holds half the sleep, so the sleep is long against a step of this model on a loaded machine."""
    from bigscience_train.report.build import summary_rows
    from bigscience_train.report.run_data import read_run

    run = tmp_path / "run"
    out = run_script(
        "straggler_check.py",
        2,
        [*FAST, "train.iters=6", "logging.log_interval=3", *data_overrides(tiny_data, run)],
        {"SLOW_RANK": "1", "SLOW_SECONDS": "1.5"},
    )
    assert out.returncode == 0, out.stderr
    stragglers = read_metrics(run, "straggler")
    assert [(r["step"], r["rank"], r["node"]) for r in stragglers] == [
        (3, 1, socket.gethostname()),
        (6, 1, socket.gethostname()),
    ]
    assert all(r["busy_time"] > 1.5 > r["median"] for r in stragglers)
    assert f"straggler at step 3: rank 1 on {socket.gethostname()}" in out.stdout
    for r in read_metrics(run):
        phases = r["data_time"] + r["forward_backward_time"] + r["optimizer_time"]
        assert min(r["data_time"], r["forward_backward_time"], r["optimizer_time"]) > 0
        assert phases <= r["step_time"] and r["comm_wait"] > 1.2  # rank 0 waited for rank 1's sleep
        assert r["slowest_rank"] == 1
    rows = dict(summary_rows(read_run(run)))
    assert rows["stragglers"].startswith(f"2 logs; worst rank 1 on {socket.gethostname()}")
    assert rows["s per step (last 10 logs)"].startswith("data ")


def test_a_rank_that_crashes_once_restarts_the_job_from_latest_within_it(tiny_data, tmp_path):
    """cluster.max_restarts is torchrun's --max-restarts: rank 1 dies at step 5, torchrun restarts both ranks,
    and they resume from step 4's checkpoint to the end, as the uninterrupted run went."""
    common = [*FAST, "train.iters=8", "checkpoint.interval=2"]
    straight, run, marker = tmp_path / "straight", tmp_path / "run", tmp_path / "crashed"
    assert run_cli(["train", *common, *data_overrides(tiny_data, straight)], nproc=2).returncode == 0
    cmd = [
        *torchrun(2, [str(ROOT / "tests" / "crash_check.py"), *common, *data_overrides(tiny_data, run)]),
    ]
    cmd.insert(cmd.index("--standalone") + 1, "--max-restarts=1")
    # As the rendered sbatch does with cluster.max_restarts (slurm/script.py).
    env = child_env(
        {
            "CRASH_RANK": "1",
            "CRASH_STEP": "5",
            "CRASH_MARKER": str(marker),
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        }
    )
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert marker.exists() and "resumed from" in out.stdout
    resumed = {r["step"]: r["loss"] for r in read_metrics(run)}
    assert resumed == {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert json.loads((run / "last_stop.json").read_text())["reason"] == "iters"
