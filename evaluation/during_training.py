"""Zero-shot tasks scored on the live model every train.eval_tasks_interval steps, as BigScience did every 1k
iterations: a step hook the entry point attaches to the trainer, so training itself never imports lm-eval."""

from __future__ import annotations

from bigscience_train.checkpoint.paths import step_dir_name
from evaluation.run import run_tasks, write_results
from evaluation.tasks import task_specs


class TaskEvaluation:
    def __init__(self, train_cfg):
        # Resolved (and their data checked) now: a missing dataset fails before the first step.
        self.specs = task_specs(list(train_cfg.eval_tasks))
        self.interval, self.limit = train_cfg.eval_tasks_interval, train_cfg.eval_tasks_limit

    def __call__(self, trainer) -> None:
        if trainer.state.step % self.interval:
            return
        from evaluation.lm import BigScienceLM  # lm-eval: the [eval] extra, loaded only when asked for

        # FSDP gathers parameters over the data-parallel ranks, which must then score the same requests.
        lm = BigScienceLM(
            trainer.model,
            trainer.tokenizer,
            trainer.penv,
            trainer.dtype,
            shard_requests=not trainer.penv.dims.fsdp,
        )
        results = run_tasks(lm, self.specs, 0, self.limit, bootstrap_iters=0)
        if trainer.writer is None:
            return
        values = {
            f"{task}/{key.split(',')[0]}": value
            for task, metrics in results["results"].items()
            for key, value in metrics.items()
            if isinstance(value, float) and "stderr" not in key
        }
        trainer.writer.log(trainer.record("tasks", values))
        info = {
            "run": str(trainer.run_dir),
            "step": trainer.state.step,
            "consumed_tokens": trainer.state.consumed_tokens,
        }
        write_results(trainer.run_dir / "eval" / step_dir_name(trainer.state.step), results, info)
