"""train.skip_iterations (Megatron-DeepSpeed's --skip-train-iteration-range) and data.valid's named validation
sets (its --valid-weighted-split-paths), on short runs over the tiny dataset."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bigscience_train.checkpoint.dcp import step_dir_name
from bigscience_train.checkpoint.reader import iter_model_tensors
from bigscience_train.config import ConfigError, load_config, validate
from bigscience_train.config.from_megds import check, convert
from bigscience_train.config.megds_launch import LaunchError
from bigscience_train.report.build import build_report, summary_rows
from bigscience_train.report.run_data import read_run
from bigscience_train.schedules import LRSchedule
from tests.conftest import read_metrics
from tests.test_gpt_data import random_dataset
from tests.test_train import FAST, train

# The ramp-up reaches 8 samples at 24 consumed, inside the range: skipped batches are 4, 4, 8, 8 samples.
RAMP = "train.rampup_batch_size=[4,4,24]"
SKIP = "train.skip_iterations=[[5,8]]"
SKIPPED = 4 + 4 + 8 + 8


def by_step(run, kind="train"):
    return {r["step"]: r for r in read_metrics(run, kind)}


def weights(step_dir):
    return dict(iter_model_tensors(step_dir))


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """straight: no skipping; skip: iterations 5-8 skipped; interrupted: the same, stopped every 3 steps
    (before the range, inside it, after it) and resumed each time."""
    root = tmp_path_factory.mktemp("skip")
    # No validation: these runs are about the training steps.
    common = ["train.iters=12", RAMP, "train.eval_iters=0"]
    train(tiny_data, root / "straight", *common)
    train(tiny_data, root / "skip", *common, SKIP, "checkpoint.interval=4")
    # As a chain of jobs with one train.exit_interval: each job resumed at a multiple of it trains 3 steps on.
    stops = [
        train(tiny_data, root / "interrupted", *common, SKIP, f"train.exit_interval={every}")
        for every in (3, 3, 3, "null")
    ]
    return root, stops


def test_skipped_iterations_consume_their_batches_without_a_step(runs):
    root, _ = runs
    straight, skip = by_step(root / "straight"), by_step(root / "skip")
    assert sorted(skip) == [1, 2, 3, 4, 9, 10, 11, 12]
    for step in (1, 2, 3, 4):
        assert skip[step]["loss"] == straight[step]["loss"]
    # The data, the ramp-up and the iteration count move on as if 5-8 had trained.
    for step in (9, 10, 11, 12):
        for key in ("consumed_samples", "consumed_tokens", "batch_size"):
            assert skip[step][key] == straight[step][key]
    assert skip[9]["consumed_samples"] - skip[4]["consumed_samples"] == SKIPPED + 8
    assert skip[9]["loss"] != straight[9]["loss"]
    (record,) = read_metrics(root / "skip", "skip")
    assert (record["step"], record["first"], record["last"]) == (4, 5, 8)
    state = json.loads((root / "skip" / "checkpoints" / step_dir_name(12) / "train_state.json").read_text())
    assert (state["step"], state["lr_skipped_samples"], state["lr_skipped_tokens"]) == (
        12,
        SKIPPED,
        SKIPPED * 64,
    )


def test_the_lr_schedule_holds_over_skipped_iterations_as_megatron_deepspeed(runs):
    """Megatron-DeepSpeed `continue`s past a skipped range before train_step, the only place its LR scheduler
    steps: the first iteration after the range gets the rate iteration 5 would have had."""
    root, _ = runs
    straight, skip = by_step(root / "straight"), by_step(root / "skip")
    # Samples trained before steps 9..12 of the skip run: those before steps 5, 7, 8, 9 of the straight one.
    assert [skip[s]["lr"] for s in (9, 10, 11, 12)] == [straight[s]["lr"] for s in (5, 7, 8, 9)]
    cfg = load_config(FAST)
    schedule = LRSchedule(cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_samples, 72, "cosine")
    for step in (9, 10, 11, 12):
        before = skip[step]["consumed_samples"] - skip[step]["batch_size"]
        assert skip[step]["lr"] == pytest.approx(schedule.at(before - SKIPPED), rel=1e-12)


def test_weights_do_not_change_over_skipped_iterations_and_resuming_anywhere_is_exact(runs):
    root, stops = runs
    assert [(s.stop_reason, s.state.step) for s in stops] == [
        ("exit_interval", 3),
        ("exit_interval", 6),
        ("exit_interval", 9),
        ("iters", 12),
    ]
    # Stopped at step 6, inside the range: 5 and 6 skipped, and the weights are step 4's.
    assert stops[1].state.lr_skipped_samples == 8
    inside = weights(root / "interrupted" / "checkpoints" / step_dir_name(6))
    before = weights(root / "skip" / "checkpoints" / step_dir_name(4))
    assert inside.keys() == before.keys()
    assert all(torch.equal(inside[k], before[k]) for k in inside)
    skip, interrupted = by_step(root / "skip"), by_step(root / "interrupted")
    assert sorted(interrupted) == sorted(skip)
    for step, record in skip.items():
        for key in ("loss", "lr", "grad_norm", "consumed_samples", "batch_size"):
            assert interrupted[step][key] == record[key], (step, key)
    # One line per range entered: at step 4, and again for what was left of it after the stop at 6.
    assert [(r["first"], r["last"]) for r in read_metrics(root / "interrupted", "skip")] == [(5, 8), (7, 8)]


def test_bad_skip_ranges_and_valid_sets_are_named_in_one_error():
    cfg = load_config(
        [
            "model=gpt_tiny",
            "train.iters=10",
            "data.tokenizer=tok.json",
            "train.skip_iterations=[[5,3],[0,2],[10,20],[15,30],[7]]",
            "data.valid=[{name:fr,prefix:[a]},{name:fr,weight:0,prefix:[a,b,c]},{name:x,prefix:[a],split:'9,0,1'}]",
        ]
    )
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert error.value.problems == [
        "train.skip_iterations[0]=[5, 3]: first=5 is after last=3",
        "train.skip_iterations[1]=[0, 2]: iterations count from 1; first=0 must be positive",
        "train.skip_iterations[4]=[7] must be [first, last]",
        "train.skip_iterations[2]=[10, 20] and [3]=[15, 30] overlap (iteration 15)",
        "data.valid[1].name='fr' is used by an earlier set: names are metric keys",
        "data.valid[1].weight=0.0 must be positive",
        "data.valid[1].prefix has 3 entries; expected [prefix] or weight/prefix pairs",
        "data.valid[2].split='9,0,1' gives data.valid[2] (x) an empty valid split",
    ]
    # Ranges that touch do not overlap.
    validate(load_config(["model=gpt_tiny", "train.iters=10", "train.skip_iterations=[[1,4],[5,5]]"]))


def test_named_validation_sets_are_logged_each_and_as_their_weighted_mean(tiny_data, tmp_path):
    other = random_dataset(str(tmp_path / "random"))
    held = f"{{name:held,prefix:[{tiny_data['prefix']}]}}"
    mix = f"{{name:mix,weight:3,prefix:[0.5,{tiny_data['prefix']},0.5,{other}],split:'0,1,0'}}"
    common = ["train.iters=2", "train.eval_interval=1", "train.eval_iters=1"]
    train(tiny_data, tmp_path / "default", *common)
    train(tiny_data, tmp_path / "both", *common, f"data.valid=[{held},{mix}]", "logging.tensorboard=true")
    train(tiny_data, tmp_path / "mix", *common, f"data.valid=[{mix}]")
    default, both, alone = (by_step(tmp_path / n, "valid") for n in ("default", "both", "mix"))
    assert sorted(both) == [0, 1, 2]
    # Named sets change what is evaluated, never what is trained.
    assert [r["loss"] for r in read_metrics(tmp_path / "both")] == [
        r["loss"] for r in read_metrics(tmp_path / "default")
    ]
    for step, r in both.items():
        # A set over the training prefix under data.split is data.blend's own valid split.
        assert r["val_loss/held"] == default[step]["val_loss"]
        assert r["val_loss/mix"] == alone[step]["val_loss/mix"] == alone[step]["val_loss"]
        assert r["val_loss"] == pytest.approx((r["val_loss/held"] + 3 * r["val_loss/mix"]) / 4, rel=1e-12)
        assert r["val_loss/held"] != r["val_loss/mix"]
    events = EventAccumulator(str(tmp_path / "both" / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("held", "mix"):
        assert {f"valid/val_loss/{name}", f"valid-vs-tokens/val_loss/{name}", f"valid/val_ppl/{name}"} <= tags
    index, _ = build_report(tmp_path / "both")
    rows = dict(summary_rows(read_run(tmp_path / "both")))
    assert rows["validation loss (last), weighted mean of the sets"] == f"{both[2]['val_loss']:.4f}"
    assert rows["validation loss held (last)"] == f"{both[2]['val_loss/held']:.4f}"
    assert rows["validation loss mix (last)"] == f"{both[2]['val_loss/mix']:.4f}"
    figure = (index.parent / "figures.svg").read_text()
    assert "validation: held" in figure and "validation: mix" in figure


def test_a_weighted_training_blend_trains_with_a_test_share(tiny_data, tmp_path):
    """The trainer builds no test split: megatron-core refuses one epoch of it from a weighted blend."""
    other = random_dataset(str(tmp_path / "random"))
    blend = f"data.blend=[0.5,{tiny_data['prefix']},0.5,{other}]"
    result = train(tiny_data, tmp_path / "run", "train.iters=1", "train.eval_iters=1", blend)
    assert result.state.step == 1 and result.last_val_loss is not None


def test_megatron_deepspeed_skip_ranges_and_valid_groups_convert(tmp_path):
    launch = tmp_path / "run.sh"
    launch.write_text(
        "python pretrain_gpt.py --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128 \\\n"
        "  --max-position-embeddings 128 --micro-batch-size 1 --global-batch-size 8 --train-iters 100 \\\n"
        "  --data-path /d/a_text_document --skip-train-iteration-range 30-40 35-50 70-70 \\\n"
        '  --valid-weighted-split-paths "fr: 0.6 0.9:1 /d/fr, 0.4 0.9:1 /d/fr2" "en: 1 0:1 /d/en"\n'
    )
    conversion = convert(launch)
    cfg = load_config(conversion.lines)
    assert [list(r) for r in cfg.train.skip_iterations] == [[30, 50], [70, 70]]
    skip = next(o for o in conversion.overrides if o.key == "train.skip_iterations")
    assert skip.how == "overlapping ranges merged, as Megatron-DeepSpeed does"
    assert [(v.name, list(v.prefix), v.split) for v in cfg.data.valid] == [
        ("fr", ["0.6", "/d/fr", "0.4", "/d/fr2"], "0.9,0.1,0"),
        ("en", ["/d/en"], "0,1,0"),
    ]
    names = {u.argument for u in conversion.unmapped}
    assert not names & {"--skip-train-iteration-range", "--valid-weighted-split-paths"}
    assert not [p for p in check(conversion)[1] if "skip_iterations" in p or "data.valid" in p]
    launch.write_text(launch.read_text().replace("0.4 0.9:1", "0.4 0.8:1"))
    with pytest.raises(LaunchError, match="group 'fr' reads different ranges"):
        convert(launch)
