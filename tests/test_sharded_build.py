"""One rank of a big layout, built in one process as that rank of a fake process group: it allocates only its
own shards, and its data-parallel traffic is what each ZeRO mode promises (test_parallel.py checks the values
against one process over gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).parent / "build_rank_check.py"
TRAFFIC = Path(__file__).parent / "traffic_check.py"
MIB = 1024**2


def build_rank(model, tp, pp, dp, zero, rank, device) -> dict:
    out = subprocess.run(
        [sys.executable, str(CHECK), model, str(tp), str(pp), str(dp), zero, str(rank), device],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def data_parallel_traffic(cases: list[str], device: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(TRAFFIC), "2", *cases],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DEVICE": device},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "model, tp, pp, dp, zero, rank",
    [
        ("gpt_1b3", 4, 1, 8, "zero3", 5),
        ("gpt_1b3", 2, 4, 2, "zero1", 0),
        # BigScience's tr1-13B layout: the first pipeline stage, which also holds the embedding.
        ("tr1_13b", 2, 4, 64, "zero1", 0),
    ],
)
def test_a_rank_grows_by_its_shard_not_its_stage(model, tp, pp, dp, zero, rank):
    report = build_rank(model, tp, pp, dp, zero, rank, "cpu")
    assert report["held"] > 50 * MIB
    assert report["grown"] <= 1.5 * report["held"] + 64 * MIB, report
    assert len(report["stages"]) == {1: 24, 4: 6 if model == "gpt_1b3" else 10}[pp]


def test_data_parallel_traffic_per_step_follows_the_zero_mode_and_dtypes():
    """rank 0 of (tp, pp, dp) = (2, 1, 4), 4 micro-batches per step, 5 FSDP units (4 blocks and the root)."""
    cases = ["none:fp32:fp32", "none:bf16:fp32", "zero1:bf16:fp32", "zero1:fp16:bf16", "zero2:fp32:fp32"]
    cases.append("zero3:bf16:fp32")
    got = data_parallel_traffic(cases, "cpu")
    counts = {case: {k: v[0] for k, v in traffic.items() if k != "largest"} for case, traffic in got.items()}
    # Replicas: one all-reduce per unit and step, in the reduce dtype, whatever the training dtype.
    assert counts["none:fp32:fp32"] == counts["none:bf16:fp32"] == {"all_reduce float32": 5}
    # ZeRO-1: parameters gathered once per step in the training dtype, gradients reduce-scattered once.
    assert counts["zero1:bf16:fp32"] == {"all_gather bfloat16": 5, "reduce_scatter float32": 5}
    assert counts["zero1:fp16:bf16"] == {"all_gather float16": 5, "reduce_scatter bfloat16": 5}
    # The gathered bf16 parameters are half the bytes of the fp32 gradients they meet.
    zero1 = got["zero1:bf16:fp32"]
    assert 2 * zero1["all_gather bfloat16"][1] == zero1["reduce_scatter float32"][1]
    # ZeRO-2: a reduce-scatter per unit and micro-batch; ZeRO-3 also gathers again for each backward.
    assert counts["zero2:fp32:fp32"] == {"all_gather float32": 5, "reduce_scatter float32": 20}
    assert counts["zero3:bf16:fp32"] == {"all_gather bfloat16": 40, "reduce_scatter float32": 20}
    # Unit by unit: no reduction carries the whole model at once.
    replicas = got["none:fp32:fp32"]
    assert replicas["largest"] < 0.5 * replicas["all_reduce float32"][1]


def test_pipeline_stages_reduce_gradients_during_their_last_backward():
    """A stage's units reduce over dp as autograd reaches them in its last micro-batch's backward, once per
    step, at every schedule and ZeRO mode; none is left to the schedule's reduction after every backward (torch's
    stage leaves them all there). Each stage of (pp=2, dp=2) with 4 blocks holds 3 units (its 2 blocks and its
    root with the embedding or the output layer); interleaved, rank 0's two stages hold 2 and 1."""
    check = Path(__file__).parent / "pipeline_overlap_check.py"
    cases = ["0:1f1b:zero1:1", "2:1f1b:zero2:1", "0:interleaved_1f1b:zero3:2", "2:gpipe:none:1"]
    out = subprocess.run([sys.executable, str(check), *cases], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert {case: (r["during_backward"], r["after_backward"]) for case, r in got.items()} == {
        case: (3, 0) for case in cases
    }
