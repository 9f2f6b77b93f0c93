"""`bigscience ckpt export-megds` read back by DeepSpeed itself: our gpt_tiny run (fp32, one process) saved at
step 3 is exported as a DeepSpeed universal checkpoint and loaded by DeepSpeed's engine, configured with
`"checkpoint": {"load_universal": true}`, into the tiny Megatron-named BLOOM of tests/megds_fixture.py: at
(tp, pp) = (1, 2) in fp32 with ZeRO-1, where it then trains steps 4 and 5, and at (2, 1) in bf16 with ZeRO-1
and the vocabulary padded to 768 rows. The truth is our checkpoint and the losses our trainer logged after it.

DeepSpeed 0.19.8 loads no universal checkpoint into its BF16_Optimizer (bf16 with ZeRO stage 0, BLOOM-176B's
setting): its engine hands the load to that optimizer's legacy path, which needs the ZeRO partition files (and
its ds_to_universal cannot convert such a checkpoint either), so that layout is not tested; nor is fp16 in
DeepSpeed's engine, which refuses fp16 on a CPU without fp16 kernels: the fp16 loss scaler is checked as
DeepSpeed unpickles it and runs it.
"""

import json
import math

import pytest
import torch

from bigscience_train.checkpoint.megds_export import export_megds
from bigscience_train.checkpoint.megds_import import import_megds
from bigscience_train.checkpoint.safe_load import load_megds_file
from bigscience_train.train.precision import DynamicLossScaler
from tests.conftest import read_metrics, run_cli
from tests.test_megds_import import ITERS, SAVED_AT, STATES, read, run_config, stored, write_megds
from tests.test_train import train

EMBEDDING = "transformer.word_embeddings.weight"


@pytest.fixture(scope="module")
def ours(tiny_data, tmp_path_factory):
    """Our run of the config DeepSpeed's model trains in tests/megds_fixture.py, with a checkpoint at step 3."""
    run = tmp_path_factory.mktemp("ours") / "run"
    train(tiny_data, run, f"train.iters={ITERS}", f"checkpoint.interval={SAVED_AT}")
    return run


def saved(run):
    return run / "checkpoints" / f"step_{SAVED_AT:07d}"


def deepspeed_resumes(tiny_data, out, export, *layout):
    """DeepSpeed's engine loads `export`: the state it holds then (stage 0's counters), and its losses after."""
    _, loaded = write_megds(tiny_data, out, f"--resume={export}", *layout)
    return loaded, torch.load(out / "truth_stage0.pt")


def assert_loaded_is_ours(tensors: dict, loaded: dict) -> None:
    """Every master and moment DeepSpeed holds is ours; embedding rows beyond ours (padding) are zeros."""
    assert loaded["fp32"], "DeepSpeed reported no parameters"
    for state in STATES:
        for name, theirs in loaded[state].items():
            mine = stored(tensors, state, name)
            if name == EMBEDDING:
                assert not theirs[mine.shape[0] :].any(), (state, "padding rows are not zeros")
                theirs = theirs[: mine.shape[0]]
            assert torch.equal(mine, theirs), (state, name)
    assert set(loaded["fp32"]) == {k[len("model.") :] for k in tensors if k.startswith("model.")} - {
        "lm_head.weight"
    }


def test_deepspeed_resumes_the_export_with_our_state_and_continues_as_we_did(ours, tiny_data, tmp_path):
    export = tmp_path / "export"
    done = run_cli(["ckpt", "export-megds", str(saved(ours)), str(export), "--pp", "2"])
    assert done.returncode == 0, done.stderr
    assert "universal checkpoint of step 3 for tp=1 pp=2" in done.stdout
    assert "--universal-checkpoint --no-load-rng" in done.stdout
    assert (export / "latest_universal").read_text() == (export / "latest").read_text() == "global_step3"
    assert sorted(p.name for p in export.iterdir()) == ["global_step3", "latest", "latest_universal"]

    loaded, counters = deepspeed_resumes(tiny_data, tmp_path / "deepspeed", export, "--pp=2")
    assert_loaded_is_ours(read(saved(ours)), loaded)
    records = read_metrics(ours)
    # Steps 4 and 5 in fp32: the learning rate, clipping, AdamW and data positions as ours, to 1e-5.
    assert loaded["losses"] == pytest.approx([r["loss"] for r in records[SAVED_AT:]], abs=1e-5)
    # DeepSpeed took the param groups' settings: step 4's learning rate, and the step count (apex's FusedAdam's).
    groups = [(g["lr"], g["weight_decay"], g["step"]) for g in counters["param_groups"]]
    assert groups == [(records[SAVED_AT]["lr"], 0.1, 3), (records[SAVED_AT]["lr"], 0.0, 3)]
    assert (counters["global_steps"], counters["global_samples"]) == (3, 24)
    assert (counters["iteration"], counters["tokens"]) == (3, 24 * 64)
    scheduler = counters["lr_scheduler"]
    assert (scheduler["num_steps"], scheduler["num_tokens"], scheduler["decay_steps"]) == (24, 24 * 64, 40)


def test_deepspeed_loads_the_export_at_another_layout_in_bf16_with_the_vocabulary_padded(
    ours, tiny_data, tmp_path
):
    summary = export_megds(saved(ours), tmp_path / "export", tp=2, pp=1, make_vocab_size_divisible_by=384)
    assert summary.rows == (512, 768) and summary.layout == {"tp": 2, "pp": 1}
    args = load_megds_file(summary.out / "mp_rank_01_model_states.pt")["args"]
    assert (args.padded_vocab_size, args.tensor_model_parallel_size, args.consumed_train_samples) == (
        768,
        2,
        24,
    )
    loaded, counters = deepspeed_resumes(
        tiny_data,
        tmp_path / "deepspeed",
        tmp_path / "export",
        "--tp=2",
        "--pp=1",
        "--zero=1",
        "--dtype=bf16",
        "--vocab-divisible-by=384",
    )
    assert loaded["fp32"][EMBEDDING].shape == (768, 64)
    assert_loaded_is_ours(read(saved(ours)), loaded)
    assert counters["global_steps"] == 3 and all(map(math.isfinite, loaded["losses"]))


def test_import_megds_of_the_export_gives_back_our_checkpoint(ours, tmp_path):
    # The run directory: its `latest`, step 5.
    summary = export_megds(ours, tmp_path / "export", tp=2, pp=2)
    assert summary.step == ITERS and not list((tmp_path / "export").glob(".*"))
    imported = import_megds(summary.out, tmp_path / "imported")
    assert imported.kind == "universal" and imported.rows == (512, 512)
    step = ours / "checkpoints" / f"step_{ITERS:07d}"
    theirs, mine = read(imported.out), read(step)
    assert sorted(theirs) == sorted(mine)
    for key, tensor in mine.items():
        assert torch.equal(theirs[key], tensor), key
    state = json.loads((step / "train_state.json").read_text())
    assert (imported.state.step, imported.state.consumed_samples, imported.state.consumed_tokens) == (
        state["step"],
        state["consumed_samples"],
        state["consumed_tokens"],
    )
    cfg, back = run_config(ours), run_config(imported.out)
    for section, fields in {
        "model": ("num_layers", "hidden_size", "num_heads", "seq_length", "position", "layernorm_epsilon"),
        "optim": ("lr", "min_lr", "weight_decay", "beta1", "beta2", "eps", "clip_grad", "warmup_samples"),
        "train": ("micro_batch_size", "global_batch_size", "seed"),
        "precision": ("dtype",),
    }.items():
        for field in fields:
            assert back[section][field] == cfg[section][field], (section, field)
    assert back.optim.decay_samples == 40


def test_fp16_loss_scale_continues_in_deepspeeds_own_scaler(tiny_data, tmp_path):
    """A run in fp16 whose scale has doubled once: DeepSpeed's DynamicLossScaler, as DeepSpeed unpickles it from
    the export, scales as ours through clean steps, doublings and overflows; the import gives ours back."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler as DeepSpeedScaler

    from tests.megds_fixture import deepspeed_comm

    run = tmp_path / "fp16"
    window = ["precision=fp16", "precision.loss_scale_window=2", "precision.hysteresis=2"]
    train(tiny_data, run, "train.iters=3", "train.eval_iters=0", *window)
    state = json.loads((run / "checkpoints" / "step_0000003" / "train_state.json").read_text())["loss_scaler"]
    assert state == {"scale": 2.0**13, "growth_tracker": 1, "hysteresis_tracker": 2}
    summary = export_megds(run, tmp_path / "export")
    theirs = TorchCheckpointEngine().load(
        str(summary.out / "zero" / "optimizer_state.pt"), map_location="cpu"
    )
    theirs = theirs["loss_scaler"]
    assert type(theirs) is DeepSpeedScaler and theirs.cur_scale == 2.0**13
    assert load_megds_file(summary.out / "mp_rank_00_model_states.pt")["args"].fp16

    mine = DynamicLossScaler(2.0**12, window=2, hysteresis=2, min_scale=1.0)
    mine.load_state_dict(state)
    scales = []
    with deepspeed_comm(tmp_path / "init"):
        for overflow in [False] * 5 + [True, True, True]:
            theirs.update_scale(overflow)
            mine.update(overflow)
            scales.append((mine.scale, theirs.cur_scale))
    k = 2.0**13
    assert (
        [a for a, _ in scales]
        == [b for _, b in scales]
        == [2 * k, 2 * k, 4 * k, 4 * k, 8 * k, 8 * k, 4 * k, 2 * k]
    )
    assert import_megds(summary.out, tmp_path / "imported").state.loss_scaler == state


def test_export_refuses_what_megatron_cannot_resume_and_an_existing_step(ours, tmp_path):
    export = tmp_path / "export"
    summary = export_megds(saved(ours), export)
    before = sorted(p.name for p in summary.out.rglob("*"))
    failed = run_cli(["ckpt", "export-megds", str(saved(ours)), str(export)])
    assert failed.returncode == 2 and f"{summary.out} exists" in failed.stderr
    assert sorted(p.name for p in summary.out.rglob("*")) == before
    with pytest.raises(ValueError, match=r"--tp 3 does not divide model.num_heads=4 .*; --pp 9: a pipeline"):
        export_megds(saved(ours), tmp_path / "bad", tp=3, pp=9)
    weights = import_megds(summary.out, tmp_path / "weights", weights_only=True).out
    with pytest.raises(ValueError, match="holds weights only"):
        export_megds(weights, tmp_path / "again")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "again").exists()
