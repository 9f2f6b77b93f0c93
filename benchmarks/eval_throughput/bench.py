"""Zero-shot evaluation requests/s: our lm-eval adapter against lm-eval's own `hf` backend, same model, task
and batch size, on CPU.

The model: a 6-layer, 512-wide ALiBi GPT (vocab 8192, context 512) with a BPE tokenizer trained on the
standard library, saved as our checkpoint and exported with `bigscience ckpt export-hf`; the peer loads the
export with transformers' BloomForCausalLM. Task: the bundled stdlib_choice (4 continuations per document).
Both score the same requests at batch size 16 and must give the same accuracy.

Two ratios: the adapters' own scoring (the time in lm-eval's loglikelihood call, the target), and end to
end (model loading and lm-eval's task setup included, as a user waits for it: lm-eval builds its index of
every standard task unless told otherwise, and ours does not when only bundled tasks are asked for).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import report
from bigscience_train.checkpoint.dcp import CheckpointManager, TrainState
from bigscience_train.checkpoint.hf_export import export_hf
from bigscience_train.config import load_config, to_yaml
from bigscience_train.model.gpt import build_on_meta, materialize
from bigscience_train.parallel.dims import ParallelDims
from bigscience_train.parallel.env import init_parallel
from bigscience_train.train.loop import build_optimizer
from data_tools.corpus import documents, stdlib_sources, write_jsonl
from data_tools.tokenizer_train import train_tokenizer
from evaluation.run import load_lm, run_tasks
from evaluation.tasks import bundled, bundled_config

TASK, BATCH = "stdlib_choice", 16


def make_checkpoint(d: Path) -> Path:
    corpus = d / "corpus.jsonl"
    write_jsonl(documents(stdlib_sources()[:200]), corpus)
    tokenizer = d / "tokenizer.json"
    train_tokenizer([str(corpus)], tokenizer, vocab_size=8192, show_progress=False)
    cfg = load_config(
        [
            "model.num_layers=6",
            "model.hidden_size=512",
            "model.num_heads=8",
            "model.vocab_size=8192",
            "model.seq_length=512",
            "train.iters=1",
            f"data.tokenizer={tokenizer}",
            f"run_dir={d / 'run'}",
            "logging.carbon=false",
            "logging.tensorboard=false",
        ]
    )
    # An untrained model: the work per request is the same, and no dataset is needed.
    penv = init_parallel()
    model = materialize(build_on_meta(ParallelDims().model_shape(cfg.model)), seed=0)
    manager = CheckpointManager(d / "run" / "checkpoints", penv)
    meta = {"model": cfg.model.name, "layout": {"tp": 1, "pp": 1, "dp": 1}, "dtype": "fp32"}
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    return manager.save(model, optimizer, TrainState(), to_yaml(cfg), meta)


def time_scoring(lm) -> list[float]:
    """Seconds spent in lm.loglikelihood, appended per call."""
    spent, inner = [], lm.loglikelihood

    def loglikelihood(requests, *args, **kwargs):
        start = time.perf_counter()
        out = inner(requests, *args, **kwargs)
        spent.append(time.perf_counter() - start)
        return out

    lm.loglikelihood = loglikelihood
    return spent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=100, help="documents (x4 requests)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    spec = bundled_config(bundled()[TASK])
    with tempfile.TemporaryDirectory() as d:
        step = make_checkpoint(Path(d))
        exported = export_hf(step, Path(d) / "hf")
        start = time.perf_counter()
        hf = HFLM(pretrained=str(exported), dtype="float32", device="cpu", batch_size=BATCH)
        hf_scoring = time_scoring(hf)
        theirs = simple_evaluate(
            model=hf, tasks=[spec], limit=args.limit, log_samples=False, verbosity="ERROR"
        )
        hf_s = time.perf_counter() - start
        cfg = load_config([f"eval.limit={args.limit}", f"eval.batch_size={BATCH}"])
        start = time.perf_counter()
        lm = load_lm(step, cfg, [], init_parallel())
        our_scoring = time_scoring(lm)
        ours = run_tasks(lm, [spec], 0, args.limit)
        ours_s = time.perf_counter() - start
    requests = 4 * args.limit
    acc_ours, acc_hf = ours["results"][TASK]["acc,none"], theirs["results"][TASK]["acc,none"]
    figures = {
        "threads": args.threads,
        "requests": requests,
        "hf_scoring_requests_per_s": requests / sum(hf_scoring),
        "ours_scoring_requests_per_s": requests / sum(our_scoring),
        "hf_end_to_end_s": hf_s,
        "ours_end_to_end_s": ours_s,
        "end_to_end_ours_vs_hf": hf_s / ours_s,
        "acc_ours": acc_ours,
        "acc_hf": acc_hf,
    }
    ratios = {
        "ours vs lm-eval hf backend (scoring requests/s)": {
            "value": sum(hf_scoring) / sum(our_scoring),
            "target": 1.5,
        },
        "same accuracy (1 = yes)": {"value": float(acc_ours == acc_hf), "target": 1.0},
    }
    report("eval_throughput", figures, ratios)


if __name__ == "__main__":
    main()
