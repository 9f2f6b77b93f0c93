"""`bigscience eval`: zero-shot lm-eval of one checkpoint, of a Hugging Face directory, or of every checkpoint
of a run, at the layout the overrides give (parallel.tp, dp from the world size; one process or torchrun).

    bigscience eval checkpoint=runs/demo/checkpoints/step_0000200 tasks=[stdlib_cloze,stdlib_choice]
    bigscience eval run=runs/demo                       # each checkpoint not yet evaluated on these tasks
    bigscience eval hf=/path/to/bloom-560m tasks=[lambada_openai] precision=bf16
    torchrun --nproc_per_node 2 -m evaluation checkpoint=... parallel.tp=2

Results: RUN/eval/step_N/results.json (lm-eval's, with the checkpoint's step and tokens) and results.md (a
table of each metric and its stderr), each written atomically; a later evaluation of other tasks on the same
checkpoint adds to them.

Weights are allocated in the evaluation's precision (the checkpoint's, or precision=...) and each rank reads
its shards straight into them. An hf= directory is imported once, by rank 0, into eval.import_dir (by default
beside the output; a directory every node sees), which later evaluations of the same files reuse.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig

from bigscience_train.checkpoint.paths import LATEST, committed_steps, step_dir_name
from bigscience_train.checkpoint.reader import read_meta, resolve_checkpoint
from bigscience_train.config import load_config, load_config_file
from bigscience_train.config.schema import EvalConfig
from bigscience_train.fsutil import atomic_write_text

# Short names `bigscience eval` takes for the eval.* settings: every field of EvalConfig.
SHORT_KEYS = tuple(f.name for f in dataclasses.fields(EvalConfig))
# Sections of the saved training config that the evaluation's overrides may change.
LAYOUT_SECTIONS = ("parallel", "precision")
MERGED_KEYS = ("results", "versions", "n-shot", "higher_is_better", "configs", "n-samples")
# How often the ranks waiting for rank 0's import of an hf= directory look for it.
IMPORT_POLL_SECONDS = 2.0


def expand_short_keys(overrides: list[str]) -> list[str]:
    """checkpoint=X -> eval.checkpoint=X, and so on (`checkpoint` alone is the training config's group)."""
    expanded = []
    for override in overrides:
        plus = "+" if override.startswith("+") else ""
        key = override[len(plus) :].split("=", 1)[0]
        expanded.append(f"{plus}eval.{override[len(plus) :]}" if key in SHORT_KEYS else override)
    return expanded


def evaluated_tasks(result_dir: Path) -> set[str]:
    path = result_dir / "results.json"
    return set(json.loads(path.read_text()).get("results", {})) if path.is_file() else set()


def pending_checkpoints(run_dir: Path, tasks: list[str], eval_root: Path) -> list[Path]:
    """The run's committed checkpoints, oldest first, without those already evaluated on every task."""
    root = run_dir / "checkpoints"
    steps = [root / step_dir_name(s) for s in committed_steps(root)] if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{run_dir} has no committed checkpoints (looked in {root})")
    return [s for s in steps if not set(tasks) <= evaluated_tasks(eval_root / s.name)]


def model_config(step_dir: Path, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The checkpoint's own config, with the layout and precision the evaluation asks for."""
    saved = load_config_file(step_dir / "config.yaml")
    for section in LAYOUT_SECTIONS:
        if any(o.lstrip("+").startswith(section) for o in overrides):
            saved[section] = cfg[section]
    return saved


def evaluation_dims(cfg: DictConfig):
    """The job's layout as evaluation runs it: replicas score different requests (no FSDP collectives in
    forward), nothing to recompute, and no sequence parallelism (rows of any length, few positions scored)."""
    from bigscience_train.parallel.env import job_dims

    return dataclasses.replace(job_dims(cfg), dp_shard="none", recompute="none", sequence_parallel=False)


def checkpoint_info(checkpoint: Path) -> dict:
    meta = read_meta(checkpoint)
    return {
        "checkpoint": str(checkpoint),
        "step": meta.get("step"),
        "consumed_tokens": meta.get("consumed_tokens"),
    }


def write_results(result_dir: Path, results: dict, info: dict) -> Path:
    """Merges lm-eval's `results` into results.json and results.md of `result_dir` (each replaced atomically);
    `info`: what was evaluated (checkpoint or run, step, consumed_tokens)."""
    from lm_eval.utils import handle_non_serializable, make_table

    path = result_dir / "results.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    for key in MERGED_KEYS:
        merged[key] = {**merged.get(key, {}), **results.get(key, {})}
    merged.update(info, config=results.get("config", {}))
    result_dir.mkdir(parents=True, exist_ok=True)
    what = info.get("checkpoint") or info.get("run")
    header = f"# {what} (step {info.get('step')}, {info.get('consumed_tokens') or 0:,} tokens)\n\n"
    atomic_write_text(result_dir / "results.md", header + make_table(merged) + "\n")
    atomic_write_text(path, json.dumps(merged, indent=2, default=handle_non_serializable) + "\n")
    return path


def evaluate_checkpoint(step_dir: Path, cfg: DictConfig, overrides: list[str], penv, specs: list) -> dict:
    """lm-eval's results for one checkpoint, loaded at this process's layout (every rank returns them)."""
    return run_tasks(load_lm(step_dir, cfg, overrides, penv), specs, cfg.eval.num_fewshot, cfg.eval.limit)


def load_lm(step_dir: Path, cfg: DictConfig, overrides: list[str], penv):
    """Our lm-eval model over a checkpoint, built and loaded at this process's layout."""
    from bigscience_train.checkpoint.dcp import CheckpointManager
    from bigscience_train.data.tokenizer import Tokenizer
    from bigscience_train.parallel.build import ParallelModel
    from evaluation.lm import BigScienceLM

    saved = model_config(step_dir, cfg, overrides)
    dtype = saved.precision.dtype.value
    # Allocated in the evaluation's precision and each shard read straight into it: no fp32 copy anywhere,
    # and no random values drawn first.
    built = ParallelModel(
        penv.dims.model_shape(saved.model), penv, seed=0, weights_dtype=dtype, draw_weights=False
    )
    CheckpointManager(step_dir.parent, penv).load_weights(step_dir, built.model)
    return BigScienceLM(
        built.model,
        Tokenizer.from_config(saved.data),
        penv,
        dtype,
        cfg.eval.batch_tokens,
        cfg.eval.max_gen_tokens,
        batch_size=cfg.eval.batch_size,
        pipeline=built.pipeline,
    )


def run_tasks(lm, specs: list, num_fewshot: int, limit: int | None, bootstrap_iters: int = 1000) -> dict:
    from lm_eval import simple_evaluate

    from evaluation.tasks import needs_standard_tasks, task_manager

    return simple_evaluate(
        model=lm,
        tasks=specs,
        task_manager=task_manager(needs_standard_tasks(specs)),
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
        verbosity="WARNING",
    )


def targets(cfg: DictConfig, penv) -> tuple[list[Path], Path | None]:
    """The checkpoints to evaluate, and where results go (None: each run's own eval/ folder)."""
    ev = cfg.eval
    chosen = [name for name in ("checkpoint", "hf", "run") if ev[name]]
    if len(chosen) != 1:
        raise ValueError("give exactly one of checkpoint=STEP_DIR, hf=HF_DIR or run=RUN_DIR")
    output = Path(ev.output) if ev.output else None
    if ev.checkpoint:
        return [resolve_checkpoint(ev.checkpoint)], output
    if ev.run:
        root = output or Path(ev.run) / "eval"
        return pending_checkpoints(Path(ev.run), list(ev.tasks), root), output
    output, import_dir = hf_paths(ev)
    return [imported(Path(ev.hf), import_dir, penv)], output


def hf_paths(ev) -> tuple[Path, Path]:
    """Where an evaluation of `ev.hf` writes its results, and its import (by default beside them)."""
    name = Path(ev.hf).name
    output = Path(ev.output) if ev.output else Path("runs/eval") / name / "eval"
    return output, Path(ev.import_dir) if ev.import_dir else output.parent / f"{name}-import"


def existing_import(hf_dir: Path, target: Path) -> Path | None:
    """The checkpoint of a complete import of hf_dir's present files in `target` (None: none there). An
    import is written under a temporary name and renamed when complete, so a partial one is never found."""
    from bigscience_train.checkpoint.hf_import import source_files

    if not target.exists():
        return None
    try:
        step = resolve_checkpoint(target)
    except FileNotFoundError:
        raise ValueError(
            f"eval.import_dir={target} exists but holds no import: remove it, or give another eval.import_dir"
        ) from None
    meta = read_meta(step)
    if (meta.get("imported_from"), meta.get("source_files")) != (str(hf_dir.resolve()), source_files(hf_dir)):
        raise ValueError(
            f"eval.import_dir={target} holds an import of {meta.get('imported_from')}, not of the files "
            f"{hf_dir} has now: remove it to import again, or give another eval.import_dir"
        )
    return step


def imported(hf_dir: Path, target: Path, penv) -> Path:
    """`hf_dir` as one of our checkpoints, imported once into `target`, a directory every node sees: rank 0
    converts it tensor by tensor, or reuses a complete import of the same files; the other ranks wait for
    the import to appear (a rank 0 that fails ends them through the launcher: torchrun, srun
    --kill-on-bad-exit)."""
    from bigscience_train.checkpoint.hf_import import import_hf

    target = target.resolve()
    if not penv.is_rank0:
        while not (target / "checkpoints" / LATEST).is_file():
            time.sleep(IMPORT_POLL_SECONDS)
    elif existing_import(hf_dir, target) is not None:
        print(f"reusing the import of {hf_dir} in {target}")
    else:
        for partial in sorted(target.parent.glob(f".{target.name}.tmp-*")):
            print(f"not reused: {partial}, a partial import (remove it once no other import of it runs)")
        print(f"importing {hf_dir} into {target}, once: later evaluations of it reuse the import")
        try:
            import_hf(hf_dir, target)
        except OSError:
            # Another job's import of the same files was renamed into place first.
            if existing_import(hf_dir, target) is None:
                raise
    penv.barrier()
    return resolve_checkpoint(target)


def main(overrides: list[str]) -> int:
    # Compute nodes have no internet: datasets and models come from local caches only.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bigscience_train.parallel.env import init_parallel, shutdown
    from evaluation.tasks import task_specs

    overrides = expand_short_keys(overrides)
    cfg = load_config(overrides)
    specs = task_specs(list(cfg.eval.tasks))
    if cfg.parallel.virtual_stages > 1:
        raise ValueError("parallel.virtual_stages > 1: evaluation runs one pipeline stage per rank")
    penv = init_parallel(evaluation_dims(cfg))
    if penv.is_rank0:
        print(f"evaluating on world {penv.world_size} ({penv.dims})")
    try:
        steps, output = targets(cfg, penv)
        for step_dir in steps:
            results = evaluate_checkpoint(step_dir, cfg, overrides, penv, specs)
            if penv.is_rank0:
                result_dir = (output or step_dir.parent.parent / "eval") / step_dir.name
                path = write_results(result_dir, results, checkpoint_info(step_dir))
                print((result_dir / "results.md").read_text())
                print(f"results: {path}")
        if not steps and penv.is_rank0:
            print("every checkpoint is already evaluated on these tasks")
    finally:
        shutdown()
    return 0
