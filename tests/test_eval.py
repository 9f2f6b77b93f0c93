"""Zero-shot evaluation: the lm-eval adapter's numbers, at several layouts, and against lm-eval's hf backend."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bigscience_train.checkpoint.hf_export import export_hf
from bigscience_train.config import load_config
from bigscience_train.data.tokenizer import Tokenizer
from bigscience_train.model.gpt import build_on_meta, materialize
from bigscience_train.model.shape import GPTShape
from bigscience_train.parallel.env import init_parallel
from evaluation.during_training import TaskEvaluation
from evaluation.lm import BigScienceLM, shared_rows
from evaluation.run import evaluate_checkpoint, expand_short_keys, pending_checkpoints, write_results
from evaluation.tasks import TaskDataMissing, bundled, bundled_config, task_specs
from tests.conftest import read_metrics, run_cli
from tests.test_train import train

TASKS = "tasks=[stdlib_cloze,stdlib_choice]"


@pytest.fixture(scope="module")
def lm(tiny_data):
    shape = GPTShape(num_layers=2, hidden_size=64, num_heads=4, seq_length=32, vocab_size=512)
    model = materialize(build_on_meta(shape), seed=5).eval()
    return BigScienceLM(model, Tokenizer(tiny_data["tokenizer"]), init_parallel(), batch_tokens=100)


def direct_logprob(model, tokens: list[int], n: int) -> tuple[float, bool]:
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([tokens[:-1]])).float(), -1)[0]
    positions = range(len(tokens) - 1 - n, len(tokens) - 1)
    picked = [logp[p, tokens[p + 1]].item() for p in positions]
    greedy = all(logp[p].argmax().item() == tokens[p + 1] for p in positions)
    return sum(picked), greedy


def test_loglikelihoods_equal_a_direct_computation_from_the_logits(lm):
    g = torch.Generator().manual_seed(0)
    requests = []
    for length, n in [(5, 1), (12, 3), (20, 7), (31, 2), (45, 4)]:  # the last one is longer than the context
        tokens = torch.randint(0, 500, (length,), generator=g).tolist()
        requests.append((("", ""), tokens[:-n], tokens[-n:]))
    # Multiple-choice continuations of one context: one-token ones (the same input), and inputs that are
    # prefixes of others, scored from a shared row.
    context = torch.randint(0, 500, (9,), generator=g).tolist()
    for continuation in ([7], [8], [7, 3], [7, 3, 9], [4, 4]):
        requests.append((("", ""), context, continuation))
    scores = lm._loglikelihood_tokens(requests)
    for (_, context, continuation), (logprob, greedy) in zip(requests, scores, strict=True):
        kept = (context + continuation)[-33:]
        expected, expected_greedy = direct_logprob(lm.model, kept, len(continuation))
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    # Batches of other sizes (the token budget) give the same numbers.
    lm.batch_tokens = 10_000
    assert [s for s, _ in lm._loglikelihood_tokens(requests)] == pytest.approx(
        [s for s, _ in scores], abs=1e-5
    )


def test_an_input_is_scored_by_the_longest_input_it_begins():
    inputs = [[1, 2], [1, 2, 3], [1, 2, 5], [1], [1, 2, 3, 4], [1, 2], [2], []]
    owner = shared_rows(inputs)
    for i, row in enumerate(owner):
        assert inputs[row][: len(inputs[i])] == inputs[i]
        assert not any(x[: len(inputs[row])] == inputs[row] and len(x) > len(inputs[row]) for x in inputs)
    assert owner[1] == 4 and owner[2] == 2 and owner[6] == 6
    assert len(set(owner)) == 3


def test_rolling_loglikelihood_and_greedy_generation(lm):
    class Req:
        def __init__(self, *args):
            self.args = args

    text = "def f(x):\n    return x + 1\n"
    tokens = lm.tok_encode(text)
    assert len(tokens) < 32
    (total,) = lm.loglikelihood_rolling([Req(text)])
    # One window: every token, conditioned on the end-of-document token and the tokens before it.
    assert total == pytest.approx(
        direct_logprob(lm.model, [lm.eot_token_id, *tokens], len(tokens))[0], abs=1e-4
    )
    (long_total,) = lm.loglikelihood_rolling([Req(text * 6)])
    assert long_total < total

    (generated,) = lm.generate_until([Req("def f(x):", {"until": ["\n\n"], "max_gen_toks": 5})])
    ids = lm.tok_encode("def f(x):")
    for _ in range(5):
        with torch.no_grad():
            nxt = lm.model(torch.tensor([ids[-32:]]))[0, -1].argmax().item()
        if nxt == lm.eot_token_id:
            break
        ids.append(nxt)
    assert generated == lm.tok.decode(ids[len(lm.tok_encode("def f(x):")) :]).split("\n\n")[0]


def test_short_keys_are_every_eval_setting():
    assert expand_short_keys(["checkpoint=a", "batch_size=16", "parallel.tp=2", "+limit=3"]) == [
        "eval.checkpoint=a",
        "eval.batch_size=16",
        "parallel.tp=2",
        "+eval.limit=3",
    ]


def test_standard_tasks_without_cached_data_fail_fast_with_how_to_fetch(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        TaskDataMissing, match=r"(?s)piqa needs the Hugging Face dataset baber/piqa.*login node"
    ):
        task_specs(["stdlib_cloze", "piqa"])
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        task_specs(["no_such_task"])
    assert set(bundled()) == {"stdlib_cloze", "stdlib_choice"}


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    train(tiny_data, run, "train.iters=30", "checkpoint.interval=15")
    return run


def cache_as_downloaded(cache: Path, dataset: str, config: str, rows: list[dict]) -> None:
    """A Hugging Face datasets cache laid out as `load_dataset(dataset, config)` on a login node leaves it:
    built by the datasets library from local rows, then filed under the dataset's name."""
    import datasets

    source = cache / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    builder = datasets.load_dataset_builder(
        "json", data_files={"test": str(source)}, cache_dir=str(cache / "tmp")
    )
    builder.download_and_prepare()
    namespace, name = dataset.split("/")
    target = cache / f"{namespace}___{name}" / config / "0.0.0" / "0123456789abcdef"
    target.mkdir(parents=True)
    for f in Path(builder.cache_dir).iterdir():
        (target / f.name.replace("json-", f"{name}-")).write_bytes(f.read_bytes())
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(builder_name=name, dataset_name=name, config_name=config)
    (target / "dataset_info.json").write_text(json.dumps(info))


def test_a_standard_task_runs_offline_from_the_local_datasets_cache(trained_run, tmp_path):
    lines = [line for line in Path(json.__file__).read_text().splitlines() if len(line.split()) > 4]
    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    cache_as_downloaded(cache, "EleutherAI/lambada_openai", "default", [{"text": t} for t in lines[:12]])
    env = {"HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    step = trained_run / "checkpoints" / "step_0000030"
    out = run_cli(
        ["eval", f"checkpoint={step}", "tasks=[lambada_openai]", f"output={tmp_path / 'out'}"], env=env
    )
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "out" / "step_0000030" / "results.json").read_text())
    metrics = data["results"]["lambada_openai"]
    assert data["n-samples"]["lambada_openai"]["effective"] == 12
    assert 1 < metrics["perplexity,none"] < math.inf and 0 <= metrics["acc,none"] <= 1


def results(path) -> dict:
    return {
        (task, key): value
        for task, metrics in json.loads(path.read_text())["results"].items()
        for key, value in metrics.items()
        if isinstance(value, float) and "stderr" not in key
    }


def test_same_results_at_every_layout_and_a_run_is_evaluated_once(tiny_data, trained_run, tmp_path):
    step = trained_run / "checkpoints" / "step_0000030"
    layouts = [("tp2", ["parallel.tp=2"], 2), ("pp2", ["parallel.pp=2"], 2), ("dp2", [], 2)]
    found = {}
    for name, overrides, nproc in layouts:
        out = run_cli(
            ["eval", f"checkpoint={step}", TASKS, "limit=40", f"output={tmp_path / name}", *overrides], nproc
        )
        assert out.returncode == 0, out.stderr
        found[name] = results(tmp_path / name / "step_0000030" / "results.json")
    # The reference: one process, in this one (no start-up to pay).
    specs = task_specs(["stdlib_cloze", "stdlib_choice"])
    single = evaluate_checkpoint(step, load_config(["eval.limit=40"]), [], init_parallel(), specs)
    write_results(tmp_path / "single", single, {"step": 30})
    found["single"] = results(tmp_path / "single" / "results.json")
    reference = found["single"]
    assert {task for task, _ in reference} == {"stdlib_cloze", "stdlib_choice"}
    for name, values in found.items():
        assert values.keys() == reference.keys(), name
        for key, value in values.items():
            assert value == pytest.approx(reference[key], rel=1e-4), (name, key)

    # The whole run: both checkpoints; a second pass finds nothing left to do.
    out = run_cli(["eval", f"run={trained_run}", "tasks=[stdlib_choice]", "limit=20"])
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (trained_run / "eval").iterdir()) == ["step_0000015", "step_0000030"]
    data = json.loads((trained_run / "eval" / "step_0000030" / "results.json").read_text())
    assert data["step"] == 30 and data["consumed_tokens"] == 30 * 8 * 64
    assert "| acc " in (trained_run / "eval" / "step_0000030" / "results.md").read_text().replace(
        "|acc", "| acc "
    )
    assert pending_checkpoints(trained_run, ["stdlib_choice"], trained_run / "eval") == []
    assert len(pending_checkpoints(trained_run, ["stdlib_choice", "stdlib_cloze"], trained_run / "eval")) == 2
    report = run_cli(["report", str(trained_run)])
    assert report.returncode == 0, report.stderr
    assert "stdlib_choice" in (trained_run / "report" / "index.html").read_text()
    assert "stdlib_choice acc" in (trained_run / "report" / "figures.svg").read_text()


def test_our_adapter_and_lm_evals_hf_backend_agree_on_the_exported_model(trained_run, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate

    from bigscience_train.config import load_config
    from evaluation.run import evaluate_checkpoint

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    step = trained_run / "checkpoints" / "step_0000030"
    exported = export_hf(step, tmp_path / "hf")
    specs = [bundled_config(bundled()[name]) for name in ("stdlib_choice", "stdlib_cloze")]
    common = {"tasks": specs, "limit": 40, "log_samples": False, "bootstrap_iters": 0, "verbosity": "WARNING"}
    theirs = simple_evaluate(
        model="hf", model_args=f"pretrained={exported},dtype=float32", device="cpu", batch_size=8, **common
    )
    cfg = load_config(["eval.limit=40"])
    ours = evaluate_checkpoint(step, cfg, [], init_parallel(), specs)
    for task in ("stdlib_choice", "stdlib_cloze"):
        assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
    # Perplexity: exp of a mean log-likelihood near -25 here; the two models' float rounding differs.
    assert math.log(ours["results"]["stdlib_cloze"]["perplexity,none"]) == pytest.approx(
        math.log(theirs["results"]["stdlib_cloze"]["perplexity,none"]), rel=1e-3
    )


def test_tasks_scored_during_training_are_logged_and_written_like_eval_results(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(
        tiny_data,
        run,
        "train.iters=4",
        "train.eval_tasks=[stdlib_choice]",
        "train.eval_tasks_interval=2",
        "train.eval_tasks_limit=10",
        hooks=[
            TaskEvaluation(
                load_config(
                    [
                        "train.eval_tasks=[stdlib_choice]",
                        "train.eval_tasks_interval=2",
                        "train.eval_tasks_limit=10",
                    ]
                ).train
            )
        ],
    )
    records = read_metrics(run, "tasks")
    assert [r["step"] for r in records] == [2, 4]
    assert all(0 <= r["stdlib_choice/acc"] <= 1 for r in records)
    data = json.loads((run / "eval" / "step_0000004" / "results.json").read_text())
    assert (
        data["step"] == 4 and data["results"]["stdlib_choice"]["acc,none"] == records[-1]["stdlib_choice/acc"]
    )
