import json

import pytest
import torch

from bigscience_train.checkpoint.dcp import CheckpointManager, steps_to_delete
from bigscience_train.checkpoint.hf_export import export_hf
from bigscience_train.checkpoint.inspect import describe
from bigscience_train.checkpoint.integrity import CheckpointIntegrityError, problems
from bigscience_train.checkpoint.reader import iter_model_tensors, resolve_checkpoint
from bigscience_train.config import load_config
from bigscience_train.model.gpt import GPT
from bigscience_train.parallel.dims import ParallelDims
from bigscience_train.parallel.env import init_parallel
from bigscience_train.train.loop import build_optimizer
from tests.conftest import run_cli
from tests.test_train import train


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(
        tiny_data,
        run,
        "train.iters=6",
        "checkpoint.interval=2",
        "checkpoint.keep_last=2",
        "checkpoint.keep_every=4",
    )
    return run


def tiny_model_and_optimizer():
    """gpt_tiny and its AdamW, built as the trainer builds them, in this process."""
    cfg = load_config(["model=gpt_tiny"])
    model = GPT(ParallelDims().model_shape(cfg.model))
    return model, build_optimizer(model, cfg.optim, torch.device("cpu"))


def test_retention_keeps_last_and_milestones(trained):
    assert sorted(p.name for p in (trained / "checkpoints").glob("step_*")) == [
        "step_0000004",
        "step_0000006",
    ]
    assert steps_to_delete([2, 4, 6, 8, 10], keep_last=2, keep_every=4) == [2, 6]
    assert steps_to_delete([2, 4, 6], keep_last=None, keep_every=None) == []


def test_inspect_reports_step_layout_and_config_diff(trained):
    text = describe(trained, load_config(["model=gpt_tiny", "optim.lr=1e-4"]))
    assert "step 6" in text and "tp=1 pp=1 dp=1" in text and "232,960 parameters" in text
    assert "optim.lr: 0.003 -> 0.0001" in text and ".distcp" in text
    out = run_cli(["ckpt", "inspect", str(trained / "checkpoints" / "step_0000004")])
    assert out.returncode == 0 and "step 4" in out.stdout
    diff = run_cli(["ckpt", "inspect", str(trained), "--diff", "model=gpt_tiny", "optim.lr=1e-4"])
    assert diff.returncode == 0, diff.stderr
    assert "optim.lr: 0.003 -> 0.0001" in diff.stdout
    missing = run_cli(["ckpt", "inspect", str(trained / "nope")])
    assert missing.returncode == 2 and "is not a checkpoint" in missing.stderr


def test_export_hf_loads_offline_with_matching_logits(trained, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, BloomForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = export_hf(trained, tmp_path / "hf", max_shard_bytes=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    hf = BloomForCausalLM.from_pretrained(out).eval()
    ours = GPT(ParallelDims().model_shape(load_config(["model=gpt_tiny"]).model)).eval()
    ours.load_state_dict(dict(iter_model_tensors(resolve_checkpoint(trained))), strict=True)
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), hf(tokens).logits, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("def f(x): return x")["input_ids"]) == "def f(x): return x"
    with pytest.raises(FileExistsError):
        export_hf(trained, out)


def test_export_refuses_non_bloom_positions(tiny_data, tmp_path):
    run = tmp_path / "learned"
    train(tiny_data, run, "train.iters=1", "model.position=learned")
    with pytest.raises(ValueError, match=r"no Hugging Face BLOOM equivalent: model.position=learned"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_import_hf_round_trips_and_fine_tunes_at_another_layout(trained, tiny_data, tmp_path):
    from transformers import BloomForCausalLM

    from bigscience_train.checkpoint.hf_import import import_hf
    from tests.conftest import data_overrides, read_metrics
    from tests.test_train import FAST

    exported = export_hf(trained, tmp_path / "hf")
    # A released model is often stored in bf16 under BloomModel's names: import both dtype and naming.
    BloomForCausalLM.from_pretrained(exported).transformer.to(torch.bfloat16).save_pretrained(
        tmp_path / "hf16"
    )
    (tmp_path / "hf16" / "config.json").write_text((exported / "config.json").read_text())
    imported = import_hf(exported, tmp_path / "imported", seq_length=64)
    ours = dict(iter_model_tensors(resolve_checkpoint(trained)))
    back = dict(iter_model_tensors(resolve_checkpoint(imported)))
    assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)
    half = dict(iter_model_tensors(resolve_checkpoint(import_hf(tmp_path / "hf16", tmp_path / "imp16", 64))))
    assert half["transformer.h.0.mlp.dense_4h_to_h.weight"].dtype == torch.bfloat16
    assert torch.allclose(half["lm_head.weight"].float(), ours["lm_head.weight"], atol=1e-2)

    # Fine-tune the import at tp=2: the first validation loss is the trained run's last one. Its async saves,
    # two processes each writing in the background, commit checkpoints that load back whole in one process.
    run = tmp_path / "ft"
    done = run_cli(
        [
            "train",
            *FAST,
            *data_overrides(tiny_data, run),
            "train.iters=2",
            "parallel.tp=2",
            f"train.load={imported}",
            "train.finetune=true",
            "checkpoint.interval=1",
            "checkpoint.async_save=true",
        ],
        nproc=2,
    )
    assert done.returncode == 0, done.stderr
    assert "fine-tuning from the weights of" in done.stdout
    first = read_metrics(run, "valid")[0]
    assert first["step"] == 0
    assert first["val_loss"] == pytest.approx(read_metrics(trained, "valid")[-1]["val_loss"], abs=1e-5)
    tuned = resolve_checkpoint(run)
    assert tuned.name == "step_0000002" and (run / "checkpoints" / "step_0000001").is_dir()
    meta = json.loads((tuned / "meta.json").read_text())
    assert meta["async"] and {"__0_0.distcp", "__1_0.distcp"} <= meta["checksums"].keys()
    assert problems(tuned) == []
    tuned_weights = dict(iter_model_tensors(tuned))
    assert tuned_weights.keys() == ours.keys()
    assert not torch.equal(
        tuned_weights["transformer.h.0.mlp.dense_4h_to_h.weight"],
        ours["transformer.h.0.mlp.dense_4h_to_h.weight"],
    )
    whole = run_cli(
        [
            "train",
            *FAST,
            *data_overrides(tiny_data, tmp_path / "x"),
            "train.iters=2",
            f"train.load={imported}",
        ]
    )
    assert whole.returncode == 2 and "holds weights only" in whole.stderr


def test_a_damaged_shard_is_named(trained, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(resolve_checkpoint(trained), copy)
    shard = next(copy.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=rf"{shard.name}: checksum"):
        export_hf(copy, tmp_path / "hf")
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointIntegrityError, match=rf"{shard.name}: .* bytes, meta.json records"):
        export_hf(copy, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_one_process_load_and_save_exchange_no_plans(trained, tmp_path, monkeypatch):
    """With one process DCP loads and saves without gathering and scattering its plans (they pickle every
    item); the trained run's checkpoint resumes the model and optimizer as saved."""

    def refuse(*args, **kwargs):
        raise AssertionError("plans exchanged")

    monkeypatch.setattr(torch.distributed, "gather_object", refuse)
    monkeypatch.setattr(torch.distributed, "scatter_object_list", refuse)
    model, optimizer = tiny_model_and_optimizer()
    manager = CheckpointManager(trained / "checkpoints", init_parallel())
    state = manager.load(manager.latest(), model, optimizer)
    assert state.step == 6
    saved = dict(iter_model_tensors(resolve_checkpoint(trained)))
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())
    assert optimizer.state and all(s["step"] == 6 for s in optimizer.state.values())
    for async_save in (False, True):
        saver = CheckpointManager(tmp_path / str(async_save), init_parallel(), async_save=async_save)
        saver.save(model, optimizer, state, "", {})
        saver.finish()
        assert saver.latest().name == "step_0000006"
