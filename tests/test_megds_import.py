"""`bigscience ckpt import-megds` against checkpoints DeepSpeed itself writes (tests/megds_fixture.py): a tiny
BLOOM with Megatron-DeepSpeed's names and layout trained 3 steps by DeepSpeed's engine at (tp, pp, dp) =
(1, 2, 1) in fp32 with ZeRO-1, (2, 1, 1) in bf16 with DeepSpeed's bf16 optimizer (BLOOM's ZeRO stage 0) and
(1, 1, 2) in bf16 with ZeRO-1, saved by DeepSpeed and converted by DeepSpeed's ds_to_universal. The truth is
DeepSpeed's own view of its state at the save (safe_get_full_fp32_param / safe_get_full_optimizer_state) and
the losses of the steps it trained after it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bigscience_train.checkpoint.hf_export import export_hf
from bigscience_train.checkpoint.megds_import import import_megds, loss_scale_state
from bigscience_train.checkpoint.reader import resolve_checkpoint
from bigscience_train.checkpoint.safe_load import (
    SafeReader,
    UnsafeCheckpointError,
    load_megds_file,
    safe_dcp_load,
)
from bigscience_train.config import load_config
from bigscience_train.config.load import load_config_file
from tests.conftest import ROOT, child_env, data_overrides, read_metrics, run_cli
from tests.test_checkpoint_reader import Planted
from tests.test_train import FAST

SAVED_AT = 3
ITERS = 5
STATES = ("fp32", "exp_avg", "exp_avg_sq")


def config(tiny_data, run_dir) -> list[str]:
    """The run DeepSpeed trains and ours continues: gpt_tiny, 8 samples a step, 5 steps."""
    return [*FAST, *data_overrides(tiny_data, run_dir), f"train.iters={ITERS}"]


def write_megds(tiny_data, out, *options):
    """DeepSpeed trains SAVED_AT steps, saves, trains on to ITERS (tests/megds_fixture.py)."""
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "megds_fixture.py"),
        str(out),
        f"--steps={SAVED_AT}",
        *options,
    ]
    done = subprocess.run(
        [*cmd, *config(tiny_data, out / "unused")],
        cwd=ROOT,
        env=child_env({"DS_ACCELERATOR": "cpu"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = {state: {} for state in STATES}
    for path in sorted(out.glob("truth_stage*.pt")):
        stage = torch.load(path)
        for state in STATES:
            for name, tensor in stage[state].items():
                found[state].setdefault(name, tensor)
    found["losses"] = stage["losses"]
    return out, found


@pytest.fixture(scope="module")
def pp2_fp32(tiny_data, tmp_path_factory):
    return write_megds(tiny_data, tmp_path_factory.mktemp("pp2_fp32"), "--pp=2", "--universal")


@pytest.fixture(scope="module")
def tp2_bf16_stage0(tiny_data, tmp_path_factory):
    """BLOOM-176B's setting: bf16 with DeepSpeed's bf16 optimizer (ZeRO stage 0); vocabulary padded to 768."""
    out = tmp_path_factory.mktemp("tp2_bf16")
    return write_megds(
        tiny_data, out, "--tp=2", "--pp=1", "--zero=0", "--dtype=bf16", "--vocab-divisible-by=384"
    )


@pytest.fixture(scope="module")
def dp2_bf16_zero1(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp2_bf16")
    return write_megds(
        tiny_data, out, "--pp=1", "--zero=1", "--dtype=bf16", "--vocab-divisible-by=384", "--universal"
    )


def regular(fixture):
    return fixture[0] / "checkpoints" / f"global_step{SAVED_AT}"


def universal(fixture):
    return fixture[0] / "universal" / f"global_step{SAVED_AT}"


def read(run) -> dict:
    """Every tensor of a run's checkpoint, by DCP key."""
    step = resolve_checkpoint(run)
    reader = SafeReader(step)
    metadata = reader.read_metadata().state_dict_metadata
    tensors = {
        k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in metadata.items() if hasattr(v, "size")
    }
    safe_dcp_load(tensors, reader, no_dist=True)
    return tensors


def stored(tensors: dict, state: str, name: str) -> torch.Tensor:
    return tensors[f"model.{name}" if state == "fp32" else f"optim.state.{name}.{state}"]


def assert_state_is_deepspeeds(tensors: dict, truth: dict, rows: int | None = None) -> None:
    """Every master and moment as DeepSpeed held it (the embedding's first `rows` rows only, if given)."""
    assert truth["fp32"], "no truth"
    for state in STATES:
        for name, expected in truth[state].items():
            ours = stored(tensors, state, name)
            if rows is not None and name == "transformer.word_embeddings.weight":
                ours, expected = ours[:rows], expected[:rows]
            assert torch.equal(ours, expected), (state, name)
    assert torch.equal(tensors["model.lm_head.weight"], tensors["model.transformer.word_embeddings.weight"])


def test_files_load_with_the_allow_list_and_anything_else_is_refused_unrun(pp2_fp32, tmp_path):
    for path in sorted(regular(pp2_fp32).glob("*.pt")) + sorted(universal(pp2_fp32).rglob("*.pt")):
        load_megds_file(path)
    state = load_megds_file(regular(pp2_fp32) / "mp_rank_00_model_states.pt")
    assert state["args"].position_embedding_type.name == "alibi" and state["args"].num_layers == 4
    assert isinstance(state["np_rng_state"][1], np.ndarray)
    optimizer = load_megds_file(regular(pp2_fp32) / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert optimizer["optimizer_state_dict"]["zero_stage"] == 1

    # numpy < 2 pickles its arrays under numpy.core; torch's legacy format keeps the pickle's names as text.
    legacy = tmp_path / "numpy1.pt"
    rng = np.random.get_state()
    torch.save({"np_rng_state": rng}, legacy, _use_new_zipfile_serialization=False)
    assert b"numpy._core.multiarray" in legacy.read_bytes()
    legacy.write_bytes(legacy.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert np.array_equal(load_megds_file(legacy)["np_rng_state"][1], rng[1])

    copy = tmp_path / "global_step3"
    shutil.copytree(regular(pp2_fp32), copy)
    marker = tmp_path / "ran"
    torch.save({"args": Planted(marker)}, copy / "mp_rank_00_model_states.pt")
    with pytest.raises(
        UnsafeCheckpointError, match=r"mp_rank_00_model_states.pt: refused: it needs posix.system"
    ):
        import_megds(copy, tmp_path / "out")
    failed = run_cli(["ckpt", "import-megds", str(copy), str(tmp_path / "out")])
    assert failed.returncode == 2 and "refused: it needs posix.system" in failed.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_regular_and_universal_imports_hold_deepspeeds_masters_moments_and_position(pp2_fp32, tmp_path):
    _, truth = pp2_fp32
    # DeepSpeed's save directory: its `latest` names the global_step3/ tag.
    done = run_cli(["ckpt", "import-megds", str(pp2_fp32[0] / "checkpoints"), str(tmp_path / "regular")])
    assert done.returncode == 0, done.stderr
    assert "regular Megatron-DeepSpeed checkpoint (tp=1 pp=2 dp=1)" in done.stdout
    from_universal = import_megds(universal(pp2_fp32), tmp_path / "universal")
    assert from_universal.kind == "universal"
    for run in (tmp_path / "regular", tmp_path / "universal"):
        tensors = read(run)
        assert_state_is_deepspeeds(tensors, truth)
        steps = {v.item() for k, v in tensors.items() if k.endswith(".step")}
        assert steps == {float(SAVED_AT)}
        step = resolve_checkpoint(run)
        assert json.loads((step / "train_state.json").read_text()) == {
            "step": 3,
            "consumed_samples": 24,
            "consumed_tokens": 24 * 64,
            "skipped_steps": 0,
            "loss_scaler": {},
            "lr_scale": 1.0,
            "lr_skipped_samples": 0,
            "lr_skipped_tokens": 0,
        }
        meta = json.loads((step / "meta.json").read_text())
        assert not meta["weights_only"] and meta["megds"]["pp"] == 2
        # Megatron's args, as our config: the model and the optimizer DeepSpeed ran.
        imported = run_config(run)
        assert (imported.model.num_layers, imported.model.hidden_size, imported.model.vocab_size) == (
            4,
            64,
            512,
        )
        assert (imported.optim.lr, imported.optim.warmup_samples, imported.optim.beta2) == (3e-3, 16, 0.95)
        assert (imported.train.global_batch_size, imported.precision.dtype) == (8, "fp32")


def run_config(run):
    return load_config_file(run / "config.yaml")


def continue_training(tiny_data, tmp_path, source, nproc: int, *layout) -> list[dict]:
    imported = import_megds(source, tmp_path / "imported").out
    run = tmp_path / "run"
    done = run_cli(["train", *config(tiny_data, run), *layout, f"train.load={imported}"], nproc=nproc)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "(step 3," in done.stdout
    return read_metrics(run)


def test_training_continues_from_the_import_as_in_deepspeed(pp2_fp32, tiny_data, tmp_path):
    """Steps 4 and 5 in fp32 from the regular import in one process: DeepSpeed's losses (learning rate,
    clipping and data positions included) to 1e-5."""
    records = continue_training(tiny_data, tmp_path, regular(pp2_fp32), 1)
    assert [(r["step"], r["consumed_samples"]) for r in records] == [(4, 32), (5, 40)]
    assert [r["loss"] for r in records] == pytest.approx(pp2_fp32[1]["losses"][SAVED_AT:], abs=1e-5)


def test_training_continues_from_the_universal_import_at_another_layout(pp2_fp32, tiny_data, tmp_path):
    records = continue_training(tiny_data, tmp_path, universal(pp2_fp32), 2, "parallel.tp=2")
    assert [r["loss"] for r in records] == pytest.approx(pp2_fp32[1]["losses"][SAVED_AT:], abs=1e-5)


def test_the_import_exported_to_hugging_face_computes_deepspeeds_loss(pp2_fp32, tiny_data, tmp_path):
    """BloomForCausalLM from export-hf of the import, on step 4's batch: the loss DeepSpeed computed with the
    weights it saved."""
    from transformers import BloomForCausalLM

    from bigscience_train.data.gpt_data import build_splits, collate
    from bigscience_train.data.sampling import micro_batch_indices
    from bigscience_train.data.tokenizer import Tokenizer

    _, truth = pp2_fp32
    imported = import_megds(regular(pp2_fp32), tmp_path / "imported").out
    hf = BloomForCausalLM.from_pretrained(export_hf(imported, tmp_path / "hf")).eval()
    cfg = load_config(config(tiny_data, tmp_path / "x"))
    splits = build_splits(cfg.data, 64, Tokenizer(cfg.data.tokenizer), (8 * ITERS, 16, None))
    losses = []
    with torch.no_grad():
        for indices in micro_batch_indices(8 * SAVED_AT, 8, 2, 0, 1):
            batch = collate(splits.train, indices)
            logits = hf(batch["tokens"]).logits
            token_losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
            mask = batch["loss_mask"].flatten().float()
            losses.append(((token_losses * mask).sum() / mask.sum()).item())
    assert sum(losses) / len(losses) == pytest.approx(truth["losses"][SAVED_AT], abs=1e-5)


# transformers' converter of Megatron-DeepSpeed BLOOM checkpoints, put there by `make install` (Makefile).
BLOOM_CONVERTER = Path(sys.prefix) / "share" / "bloom" / "convert_bloom_original_checkpoint_to_pytorch.py"


@pytest.mark.parametrize("fixture", ["pp2_fp32", "tp2_bf16_stage0"])
def test_transformers_converter_gives_the_model_our_import_exports(fixture, request, tmp_path):
    """transformers' convert_bloom_original_checkpoint_to_pytorch on DeepSpeed's layer files (merging tensor-
    parallel ranks at tp2, the two stages at pp2) gives, tensor for tensor, the BloomModel that export-hf of our
    import of the same checkpoint holds."""
    assert BLOOM_CONVERTER.is_file(), f"{BLOOM_CONVERTER} is missing: `make install` fetches it"
    checkpoint = regular(request.getfixturevalue(fixture))
    hf = export_hf(import_megds(checkpoint, tmp_path / "imported").out, tmp_path / "hf")
    tp = 2 if fixture.startswith("tp2") else 1
    converted = tmp_path / "converted"
    done = subprocess.run(
        [
            sys.executable,
            str(BLOOM_CONVERTER),
            f"--bloom_checkpoint_path={checkpoint}",
            f"--pytorch_dump_folder_path={converted}",
            f"--bloom_config_file={hf / 'config.json'}",
            f"--pretraining_tp={tp}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    theirs = torch.load(converted / "pytorch_model.bin", weights_only=True)
    ours = {k: v for shard in sorted(hf.glob("*.safetensors")) for k, v in load_file(shard).items()}
    # The embedding and its layernorm, 12 tensors a block, the final layernorm.
    assert len(theirs) == 3 + 12 * json.loads((hf / "config.json").read_text())["n_layer"] + 2
    for name, tensor in theirs.items():
        # In bf16 DeepSpeed's layer files hold the fp32 masters rounded; export-hf writes the masters.
        assert torch.equal(ours[f"transformer.{name}"].to(tensor.dtype), tensor), name


def test_tensor_parallel_bf16_optimizer_checkpoint_merges_to_deepspeeds_state(tp2_bf16_stage0, tmp_path):
    _, truth = tp2_bf16_stage0
    summary = import_megds(regular(tp2_bf16_stage0), tmp_path / "full")
    assert summary.layout == {"tp": 2, "pp": 1, "dp": 1} and summary.averaged == {}
    assert summary.rows == (768, 768) and not any(n.startswith("warning") for n in summary.notes)
    assert_state_is_deepspeeds(read(summary.out), truth)
    assert run_config(summary.out).precision.dtype == "bf16"

    # The weights alone: the layer files' bf16 weights (the masters rounded), the padding rows dropped.
    weights = import_megds(regular(tp2_bf16_stage0), tmp_path / "weights", vocab_size=512, weights_only=True)
    assert weights.weights_only and weights.rows == (768, 512) and weights.state.step == 0
    tensors = read(weights.out)
    assert not any(k.startswith("optim.") for k in tensors)
    for name, master in truth["fp32"].items():
        expected = master[:512] if name == "transformer.word_embeddings.weight" else master
        assert torch.equal(tensors[f"model.{name}"], expected.to(torch.bfloat16)), name
    with pytest.raises(
        ValueError, match="vocab_size=500 would drop tokens: the tokenizer's vocabulary has 512"
    ):
        import_megds(regular(tp2_bf16_stage0), tmp_path / "short", vocab_size=500)

    # Layernorms that drifted apart over tensor-parallel ranks are averaged, and named.
    drifted = tmp_path / "drifted"
    shutil.copytree(regular(tp2_bf16_stage0), drifted)
    final_norm = drifted / "layer_08-model_01-model_states.pt"
    layer = torch.load(final_norm)
    layer["weight"] = layer["weight"] + 0.25
    torch.save(layer, final_norm)
    averaged = import_megds(drifted, tmp_path / "averaged", weights_only=True)
    assert list(averaged.averaged) == ["8.weight"]
    assert averaged.averaged["8.weight"] == pytest.approx(0.25, abs=0.01)
    assert "averaged over tensor-parallel ranks: 8.weight" in averaged.describe()
    ranks = [torch.load(drifted / f"layer_08-model_0{r}-model_states.pt")["weight"].float() for r in (0, 1)]
    expected = ((ranks[0] + ranks[1]) / 2).to(torch.bfloat16)
    assert torch.equal(read(averaged.out)["model.transformer.ln_f.weight"], expected)


def test_data_parallel_zero1_partitions_and_vocabulary_padding_both_ways(dp2_bf16_zero1, tmp_path):
    _, truth = dp2_bf16_zero1
    embedding = "transformer.word_embeddings.weight"
    # The regular checkpoint keeps the 256 rows Megatron padded; the universal one holds 512 rows (DeepSpeed cut
    # the padding) and is written with 768, the padding zeros.
    from_regular = import_megds(regular(dp2_bf16_zero1), tmp_path / "regular")
    assert from_regular.layout["dp"] == 2 and from_regular.rows == (768, 768)
    assert_state_is_deepspeeds(read(from_regular.out), truth)
    from_universal = import_megds(universal(dp2_bf16_zero1), tmp_path / "universal")
    assert from_universal.rows == (768, 768)
    tensors = read(from_universal.out)
    assert_state_is_deepspeeds(tensors, truth, rows=512)
    for state in STATES:
        assert not stored(tensors, state, embedding)[512:].any()
    wider = read(import_megds(regular(dp2_bf16_zero1), tmp_path / "wider", vocab_size=1024).out)
    for state in STATES:
        assert torch.equal(stored(wider, state, embedding)[:768], truth[state][embedding])
        assert not stored(wider, state, embedding)[768:].any()
    assert run_config(tmp_path / "wider").model.vocab_size == 1024


def test_deepspeeds_fp16_loss_scale_continues_as_ours(tmp_path):
    """DeepSpeed's DynamicLossScaler mapped onto ours: the same scales, step after step, from a state after
    overflows, through doublings and halvings (the step right after an overflow excepted, where DeepSpeed waits
    one step longer)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler as DeepSpeedScaler

    from bigscience_train.train.precision import DynamicLossScaler
    from tests.megds_fixture import deepspeed_comm

    with deepspeed_comm(tmp_path / "init"):
        theirs = DeepSpeedScaler(
            init_scale=2**12,
            scale_window=4,
            delayed_shift=2,
            consecutive_hysteresis=False,
            min_scale=1,
            dtype=torch.half,
        )
        for overflow in [False, True, False, False, False, True, True, False, False, False]:
            theirs.update_scale(overflow)
        ours = DynamicLossScaler(theirs.cur_scale, window=4, hysteresis=2, min_scale=1)
        ours.load_state_dict(loss_scale_state(theirs))
        scales = []
        for overflow in [False] * 9 + [True, True, True] + [False] * 2:
            theirs.update_scale(overflow)
            ours.update(overflow)
            scales.append((ours.scale, theirs.cur_scale))
    assert [a for a, _ in scales] == [b for _, b in scales]
    # Doubled twice from 2**10, then the second and third overflows halve it (hysteresis 2).
    k = 1024
    assert [a for a, _ in scales] == [k, 2 * k, 2 * k, 2 * k, 2 * k] + [4 * k] * 5 + [2 * k] + [k] * 3
