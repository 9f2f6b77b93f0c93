"""Composes the Hydra config tree in configs/ onto the structured schema."""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bigscience_train.config.schema import RunConfig
from bigscience_train.config.store import register

PRIMARY_CONFIG = "config"


def config_dir() -> Path:
    """configs/ of this checkout, or $BIGSCIENCE_CONFIG_DIR."""
    override = os.environ.get("BIGSCIENCE_CONFIG_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "configs"
    if not (path / f"{PRIMARY_CONFIG}.yaml").is_file():
        raise FileNotFoundError(
            f"no {PRIMARY_CONFIG}.yaml in config directory {path} (set BIGSCIENCE_CONFIG_DIR)"
        )
    return path


class OverrideError(ValueError):
    """A Hydra override or YAML file that does not fit the schema (unknown key, wrong type, unknown preset)."""


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved, typed config for these Hydra overrides (e.g. ["model=gpt_350m", "parallel.tp=2"])."""
    register()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
            cfg = compose(PRIMARY_CONFIG, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        cause = f"\n  {e.__cause__}" if e.__cause__ else ""
        raise OverrideError(f"{e}{cause}") from e
    # Hydra lets `+key=value` add keys the schema lacks: those are typos too.
    unknown = unknown_keys(cfg, OmegaConf.structured(RunConfig))
    if unknown:
        raise OverrideError(f"unknown config key{'s' * (len(unknown) > 1)}: {', '.join(unknown)}")
    return cfg


def load_config_file(path: str | Path) -> DictConfig:
    """A resolved config written by an earlier run or by `bigscience slurm render`, checked against the
    schema (unknown keys and wrong types are errors naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file {path}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise OverrideError(f"{path}: {e}") from e
    return cfg


def unknown_keys(node: DictConfig, schema: DictConfig, prefix: str = "") -> list[str]:
    found = []
    known = set(schema.keys())  # `in` on a DictConfig is False for MISSING (???) values
    for key in node:
        if key not in known:
            found.append(f"{prefix}{key}")
        elif isinstance(node[key], DictConfig) and is_dataclass(OmegaConf.get_type(schema, key)):
            # Dict-typed fields (cluster.env) take any key; dataclass ones only their own.
            found += unknown_keys(node[key], schema[key], f"{prefix}{key}.")
    return found


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
