"""Task names to what lm-eval takes: the bundled tasks (this folder's YAML, read as lm-eval reads it) as config
dicts, standard lm-eval tasks by name once their Hugging Face dataset is known to be in the local cache.
Compute nodes have no internet: a missing dataset fails here, at once, with how to fetch it."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


class TaskDataMissing(RuntimeError):
    pass


def bundled() -> dict[str, Path]:
    return {path.stem: path for path in sorted(HERE.glob("*.yaml"))}


class _TaskLoader(yaml.SafeLoader):
    """YAML with lm-eval's `!function module.name` tag, for functions in this package's modules (lm-eval's own
    loader is in lm_eval.tasks, whose import takes seconds)."""


def _function(loader: yaml.SafeLoader, node: yaml.Node):
    module, _, name = loader.construct_scalar(node).rpartition(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


_TaskLoader.add_constructor("!function", _function)


def bundled_config(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_TaskLoader)


@functools.cache
def task_manager(standard: bool):
    """lm-eval's TaskManager, built once per process. Its index of lm-eval's own tasks reads thousands of
    YAML files (20-30 s), so it is built only when a standard task is asked for: bundled tasks are passed
    as config dicts and need none of it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=standard)


def needs_standard_tasks(specs: list) -> bool:
    return any(isinstance(spec, str) for spec in specs)


def standard_dataset(name: str) -> tuple[str, str | None]:
    """(dataset path, config name) of an lm-eval task, from its YAML (includes resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager(True).task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise ValueError(
            f"unknown task {name!r}: not bundled ({', '.join(bundled())}) and not an lm-eval task"
        )
    config = load_yaml(entry.yaml_path, resolve_func=False)
    return config["dataset_path"], config.get("dataset_name")


def check_cached(task: str, path: str, config_name: str | None) -> None:
    import datasets

    try:
        datasets.load_dataset_builder(path, config_name)
    except Exception as e:
        fetch = f"datasets.load_dataset({path!r}" + (f", {config_name!r}" if config_name else "") + ")"
        raise TaskDataMissing(
            f"task {task} needs the Hugging Face dataset {path}"
            + (f" ({config_name})" if config_name else "")
            + f", which is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}): {e.__class__.__name__}.\n"
            f'  On a login node with internet: python -c "import datasets; {fetch}"\n'
            "  then evaluate on compute nodes with HF_DATASETS_OFFLINE=1 (the same cache directory)."
        ) from None


def task_specs(names: list[str]) -> list[dict | str]:
    """What lm-eval's simple_evaluate(tasks=...) takes, for each name; every standard task's data checked
    first, so a missing one fails before any model is loaded."""
    local = bundled()
    specs: list[dict | str] = []
    for name in names:
        if name in local:
            specs.append(bundled_config(local[name]))
        else:
            check_cached(name, *standard_dataset(name))
            specs.append(name)
    return specs
