"""Evaluating big released models: weights loaded straight into the evaluation's precision, an hf= directory
imported once into a shared directory and reused, and `slurm eval` over as many nodes as tp x pp needs,
scoring a transformers-made BLOOM as lm-eval's own hf backend does."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigscience_train.checkpoint.hf_import import import_hf
from bigscience_train.checkpoint.reader import iter_model_tensors, model_tensors_metadata, resolve_checkpoint
from bigscience_train.config import ConfigError, load_config
from bigscience_train.dryrun.storages import StorageTracker
from bigscience_train.parallel.env import init_parallel
from bigscience_train.parallel.tensor import local_tensor
from bigscience_train.slurm.submit import prepare_eval
from evaluation.run import evaluation_dims, imported, load_lm
from tests import test_slurm_cluster
from tests.conftest import ROOT, child_env, torchrun
from tests.test_slurm_cluster import Budget, logs, submitted_job, wait_until_idle

TASKS = ("stdlib_choice", "stdlib_cloze")
# Documents per task in the comparison with lm-eval's hf backend.
LIMIT = 20
# The Slurm test's own timeout (pytest's is 600 s); its waits end a minute before it.
SLURM_TIMEOUT = 560
EOS = "<|endoftext|>"
# The local two-node Slurm cluster (slurm/local_cluster.sh), as tests/test_slurm_cluster.py brings it up.
slurm_env = test_slurm_cluster.slurm_env


def save_bloom(out: Path, tokenizer: str, seed: int, **shape) -> Path:
    """A BloomForCausalLM as transformers makes and saves one (random weights, nothing downloaded), with a
    tokenizer that both transformers and we read."""
    from transformers import BloomConfig, BloomForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    ids = {f"{name}_token_id": tok.eos_token_id for name in ("bos", "eos", "pad")}
    torch.manual_seed(seed)
    # Wider than BLOOM's 0.02: peaked next-token distributions, so that choices differ by clear margins.
    BloomForCausalLM(BloomConfig(**shape, initializer_range=0.1, **ids)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_bloom(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bloom") / "tiny-bloom"
    return save_bloom(out, tiny_data["tokenizer"], 0, vocab_size=512, hidden_size=64, n_layer=4, n_head=4)


@pytest.fixture(scope="module")
def imported_bloom(tiny_data, tmp_path_factory) -> Path:
    """The checkpoint of a BLOOM whose weights are mostly in its layers, as a big model's are (the largest
    tensor is 1/19 of the model): the memory it takes to load is its weights' and little more."""
    root = tmp_path_factory.mktemp("bloom_mem")
    hf = save_bloom(
        root / "hf", tiny_data["tokenizer"], 1, vocab_size=512, hidden_size=256, n_layer=6, n_head=4
    )
    return resolve_checkpoint(import_hf(hf, root / "imported"))


def weight_bytes(model) -> int:
    """The bytes of the parameters this process holds (each once, tied ones too)."""
    params = {id(p): local_tensor(p) for p in model.parameters()}.values()
    return sum(t.numel() * t.element_size() for t in params)


def load_peak(step: Path, dtype: str, penv, overrides: list[str]) -> tuple[int, object]:
    """The peak of the tensor storages alive while the evaluation builds and loads the model at `dtype`,
    above those alive before; and the loaded adapter."""
    overrides = [f"precision={dtype}", *overrides]
    tracker = StorageTracker(lambda: {}, fake=False)
    with tracker:
        before = tracker.total
        lm = load_lm(step, load_config(overrides), overrides, penv)
    return tracker.peak - before, lm


def largest_stored(step: Path) -> int:
    """A load reads each stored tensor whole before copying (its shard of) it in: one at a time."""
    return max(m.size.numel() * m.properties.dtype.itemsize for m in model_tensors_metadata(step).values())


def test_weights_load_straight_into_bf16_at_half_the_memory_of_fp32(imported_bloom):
    penv = init_parallel()
    fp32_peak, fp32 = load_peak(imported_bloom, "fp32", penv, [])
    fp32_weights = weight_bytes(fp32.model)
    del fp32
    bf16_peak, bf16 = load_peak(imported_bloom, "bf16", penv, [])
    bf16_weights = weight_bytes(bf16.model)
    print(f"peak while loading: fp32 {fp32_peak / 1e6:.2f} MB, bf16 {bf16_peak / 1e6:.2f} MB")
    assert bf16_weights * 2 == fp32_weights
    # Each peak: the weights in their dtype, plus the one stored (fp32) tensor being read; no fp32 model.
    largest = largest_stored(imported_bloom)
    assert largest < fp32_weights / 15
    for peak, weights in ((fp32_peak, fp32_weights), (bf16_peak, bf16_weights)):
        assert weights <= peak <= weights + 1.1 * largest
    assert bf16_peak / fp32_peak == pytest.approx(0.5, abs=0.05)

    params = dict(bf16.model.named_parameters())
    for name, stored in iter_model_tensors(imported_bloom):
        if name in params:
            assert params[name].dtype == torch.bfloat16 and torch.equal(params[name], stored.bfloat16()), name
    # ALiBi's slopes are no weights: they stay fp32 (in bf16, 2^-k for odd head counts would round).
    assert bf16.model.alibi_slopes.dtype == torch.float32
    assert bf16.model.transformer.word_embeddings.weight is bf16.model.lm_head.weight


def test_a_tensor_parallel_rank_holds_only_its_shard_in_bf16(imported_bloom, tmp_path):
    cmd = torchrun(2, ["-m", "tests.test_eval_big", str(imported_bloom), str(tmp_path)])
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    print("peak while loading, per rank at tp=2 in bf16:", ranks)
    stored = model_tensors_metadata(imported_bloom)
    whole = sum(m.size.numel() * 2 for name, m in stored.items() if name != "lm_head.weight")
    largest = largest_stored(imported_bloom)
    for r in ranks:
        # Half of every matrix, the small layernorms and biases whole; and the one stored tensor being read.
        assert r["weights"] < 0.52 * whole
        assert r["weights"] <= r["peak"] <= r["weights"] + 1.1 * largest, r


def test_hf_is_imported_once_into_a_shared_directory_then_reused(hf_bloom, tmp_path, capsys):
    penv = init_parallel()
    hf = Path(shutil.copytree(hf_bloom, tmp_path / "tiny-bloom"))
    target = tmp_path / "shared" / "tiny-bloom-import"
    # What a job killed while importing leaves: its temporary directory, which is never taken for an import.
    partial = target.parent / f".{target.name}.tmp-1"
    (partial / "checkpoints").mkdir(parents=True)
    (partial / "checkpoints" / "latest").write_text("step_0000000\n")
    step = imported(hf, target, penv)
    out = capsys.readouterr().out
    assert f"not reused: {partial}" in out and f"importing {hf} into {target}" in out, out
    assert step == target / "checkpoints" / "step_0000000"
    meta = step / "meta.json"
    written = meta.stat().st_mtime_ns

    assert imported(hf, target, penv) == step
    assert f"reusing the import of {hf} in {target}" in capsys.readouterr().out
    assert meta.stat().st_mtime_ns == written

    # Other files under the same name (a newer release) are not taken for the import made before.
    os.utime(hf / "model.safetensors", ns=(written, written + 10**9))
    with pytest.raises(ValueError, match=r"holds an import of .*tiny-bloom, not of the files"):
        imported(hf, target, penv)
    (tmp_path / "busy").mkdir()
    with pytest.raises(ValueError, match="exists but holds no import"):
        imported(hf, tmp_path / "busy", penv)


def script_of(hf: Path, tmp_path: Path, *overrides: str) -> str:
    return prepare_eval(f"hf={hf}", [*overrides, f"cluster.workdir={tmp_path}"]).script


def test_slurm_eval_takes_the_nodes_one_model_needs(hf_bloom, tmp_path):
    script = script_of(hf_bloom, tmp_path, "parallel.tp=2", "parallel.pp=2", "cluster=local_dev")
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
    assert "(tp, pp, dp) = (2, 2, 1) on 2 node(s)" in script
    assert '--nnodes="$SLURM_NNODES" --nproc-per-node=2' in script and "--rdzv-backend=c10d" in script
    out = tmp_path / "runs" / "eval" / "tiny-bloom"
    assert f"hf={hf_bloom} output={out / 'eval'} import_dir={out / 'tiny-bloom-import'}" in script
    assert "#SBATCH --nodes=1\n" in script_of(hf_bloom, tmp_path, "cluster=local_dev")
    # BLOOM-176B's evaluation layout on 8-GPU nodes: 16 ranks, two nodes.
    a100 = script_of(hf_bloom, tmp_path, "parallel.tp=4", "parallel.pp=4", "cluster=jean_zay_a100")
    assert "#SBATCH --nodes=2\n" in a100 and "--nproc-per-node=8" in a100
    srun = script_of(hf_bloom, tmp_path, "parallel.pp=4", "cluster=local_dev", "cluster.launcher=srun")
    assert "#SBATCH --nodes=2\n" in srun and "#SBATCH --ntasks-per-node=2\n" in srun
    assert 'srun --kill-on-bad-exit=1 --label "$PYTHON" -m evaluation' in srun
    with pytest.raises(ConfigError, match=r"tp x parallel.pp = 3 ranks do not divide the job's 4"):
        script_of(hf_bloom, tmp_path, "parallel.tp=3", "cluster=local_dev")
    with pytest.raises(ConfigError, match="no config.json"):
        script_of(tmp_path, tmp_path, "cluster=local_dev")


def float_metrics(results: dict) -> dict:
    return {
        (task, key): value
        for task, metrics in results["results"].items()
        for key, value in metrics.items()
        if isinstance(value, float) and "stderr" not in key
    }


@pytest.mark.timeout(SLURM_TIMEOUT, func_only=True)
def test_a_released_bloom_over_two_nodes_at_tp2_pp2_scores_as_lm_evals_hf_backend(
    slurm_env, hf_bloom, tmp_path, monkeypatch
):
    from lm_eval import simple_evaluate

    from evaluation.tasks import bundled, bundled_config

    root = tmp_path / "runs" / "eval" / hf_bloom.name
    budget = Budget(SLURM_TIMEOUT - 60, slurm_env, root)
    args = ["slurm", "eval", f"hf={hf_bloom}", f"tasks=[{','.join(TASKS)}]", f"limit={LIMIT}"]
    args += ["parallel.tp=2", "parallel.pp=2", "cluster=local_dev"]
    job = submitted_job(budget.bigscience(*args, cwd=tmp_path))

    # lm-eval's own backend on the same directory, here, while the job runs.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    theirs = simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_bloom},dtype=float32",
        device="cpu",
        batch_size=8,
        tasks=[bundled_config(bundled()[name]) for name in TASKS],
        limit=LIMIT,
        log_samples=False,
        bootstrap_iters=0,
        verbosity="WARNING",
    )

    status = wait_until_idle(budget, root, tmp_path)
    out = logs(root)
    assert re.search(rf"{job}\s+COMPLETED\s", status) and "node[1-2]" in status, status + out
    # Rank 0 imported, beside the results; the three others, on both nodes, waited for it.
    assert out.count(f"importing {hf_bloom} into {root / (hf_bloom.name + '-import')}") == 1, out
    assert "[rank0]: evaluating on world 4 (tp=2 pp=2 dp=1)" in out, out
    ours = json.loads((root / "eval" / "step_0000000" / "results.json").read_text())
    expected = float_metrics(theirs)
    assert float_metrics(ours).keys() == expected.keys() and len(expected) == 4
    # fp32 on both sides: the layouts change only the order of sums, ~1e-6 on a log-probability; 1e-4 on
    # the accuracies (multiples of 1/LIMIT) is equality, and on log(perplexity), the mean log-likelihood.
    for (task, key), value in float_metrics(ours).items():
        mine, reference = (
            math.log(v) if key.startswith("perplexity") else v for v in (value, expected[task, key])
        )
        assert mine == pytest.approx(reference, abs=1e-4), (task, key, value, expected[task, key])


if __name__ == "__main__":
    # One rank of test_a_tensor_parallel_rank_holds_only_its_shard_in_bf16 (under torchrun).
    overrides = ["parallel.tp=2"]
    penv = init_parallel(evaluation_dims(load_config(overrides)))
    peak, lm = load_peak(Path(sys.argv[1]), "bf16", penv, overrides)
    measured = {"rank": penv.rank, "peak": peak, "weights": weight_bytes(lm.model)}
    (Path(sys.argv[2]) / f"rank{penv.rank}.json").write_text(json.dumps(measured))
