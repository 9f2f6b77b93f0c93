"""The CUDA paths: NCCL, bf16 and fp16 kernels, FlexAttention's backward, compiled blocks, checkpoints of CUDA
tensors. Skipped on machines without a GPU (CI); run on one with `pytest tests/test_cuda.py`
(benchmarks/gpu_check.sh runs them before the GPU benchmarks)."""

from __future__ import annotations

import pytest
import torch

from bigscience_train.model.gpt import GPT
from bigscience_train.model.shape import GPTShape
from tests.conftest import data_overrides, read_metrics, run_cli
from tests.test_sharded_build import MIB, build_rank, data_parallel_traffic
from tests.test_train import FAST

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPE = GPTShape(num_layers=2, hidden_size=256, num_heads=4, seq_length=384, vocab_size=512)


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def cli_train(tiny_data, run_dir, *overrides):
    done = run_cli(["train", *FAST, "cluster.device=h100", *data_overrides(tiny_data, run_dir), *overrides])
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.parametrize(("precision", "async_save"), [("bf16", True), ("fp16", False)])
def test_mixed_precision_trains_and_resumes_on_cuda(tiny_data, tmp_path, precision, async_save):
    """A run cut at step 6 and resumed in a new process follows the uninterrupted one: the checkpoint of CUDA
    tensors (weights, AdamW moments, fp16 loss scale), staged to the CPU when saved asynchronously, restores
    the state."""
    common = [
        f"precision={precision}",
        f"checkpoint.async_save={async_save}",
        "train.iters=12",
        "train.rampup_batch_size=[4,4,32]",
    ]
    straight = cli_train(tiny_data, tmp_path / "straight", *common)
    assert "world 1" in straight.stdout
    run = tmp_path / "resumed"
    cli_train(tiny_data, run, *common, "train.exit_interval=6")
    assert "resumed from" in cli_train(tiny_data, run, *common).stdout
    expected = losses(tmp_path / "straight")
    assert expected[-1] < expected[0] - 0.3
    assert losses(run) == pytest.approx(expected, rel=1e-3), (losses(run), expected)
    records = read_metrics(run)
    assert all(0 < r["mfu"] < 1 for r in records)
    if precision == "fp16":
        assert records[-1]["loss_scale"] == 2.0**12


@pytest.mark.parametrize("position", ["alibi", "rotary"])
def test_flex_attention_gradients_match_sdpa(position):
    torch.manual_seed(0)
    shape = GPTShape(**{**SHAPE.__dict__, "position": position})
    sdpa = GPT(shape, device="cuda")
    flex = GPT(GPTShape(**{**shape.__dict__, "attention": "flex"}), device="cuda")
    flex.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 512, (2, 300), device="cuda")
    for model in (sdpa, flex):
        model(tokens).float().square().mean().backward()
    for (name, a), b in zip(sdpa.named_parameters(), flex.parameters(), strict=True):
        assert torch.allclose(b.grad, a.grad, rtol=1e-3, atol=1e-5), name
    # bf16: the same function within bf16's rounding (flex computes ALiBi in fp32, SDPA adds a bf16 bias).
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = sdpa(tokens).float(), flex(tokens).float()
    assert (a - b).norm() / a.norm() < 2e-2


def test_compiled_blocks_with_flex_attention_train_like_eager_sdpa(tiny_data, tmp_path):
    common = ["precision=bf16", "train.iters=8"]
    cli_train(tiny_data, tmp_path / "eager", *common)
    cli_train(tiny_data, tmp_path / "compiled", *common, "train.compile=true", "model.attention=flex")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=2e-2)


@pytest.mark.parametrize(
    "model, tp, pp, dp, zero, rank", [("gpt_1b3", 4, 1, 8, "zero3", 5), ("tr1_13b", 2, 4, 64, "zero1", 0)]
)
def test_a_rank_allocates_its_shard_on_the_gpu(model, tp, pp, dp, zero, rank):
    report = build_rank(model, tp, pp, dp, zero, rank, "cuda")
    assert report["grown"] <= 1.5 * report["held"] + 64 * MIB, report


def test_zero1_and_zero3_steps_on_cuda_move_the_training_dtype():
    got = data_parallel_traffic(["zero1:bf16:fp32", "zero3:fp16:fp32"], "cuda")
    assert {k for k in got["zero1:bf16:fp32"] if k != "largest"} == {
        "all_gather bfloat16",
        "reduce_scatter float32",
    }
    assert {k for k in got["zero3:fp16:fp32"] if k != "largest"} == {
        "all_gather float16",
        "reduce_scatter float32",
    }
