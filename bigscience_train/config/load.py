"""Composes the Hydra config tree packaged in bigscience_train/configs/ onto the structured schema, with a
user's own config directory ($BIGSCIENCE_CONFIG_DIR) searched first."""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bigscience_train.config.schema import RunConfig
from bigscience_train.config.store import register

PRIMARY_CONFIG = "config"
CONFIG_PACKAGE = "bigscience_train.configs"
USER_CONFIG_ENV = "BIGSCIENCE_CONFIG_DIR"


def user_config_dir() -> Path | None:
    """$BIGSCIENCE_CONFIG_DIR, whose files (model/my_model.yaml, cluster/slurm.yaml, ...) add to or replace
    the packaged ones; None when unset."""
    value = os.environ.get(USER_CONFIG_ENV)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{USER_CONFIG_ENV}={value} is not a directory")
    return path


class UserConfigDir(SearchPathPlugin):
    """Puts the user's config directory just before the packaged tree: Hydra takes each config (the primary
    one included) from the first directory of its search path that has it."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        packaged = f"pkg://{CONFIG_PACKAGE}"
        user = user_config_dir()
        # Registered for the whole process: other Hydra apps' search paths are left alone.
        if user is not None and any(e.path == packaged for e in search_path.get_path()):
            search_path.prepend("bigscience-user", f"file://{user}", anchor=SearchPathQuery(path=packaged))


class OverrideError(ValueError):
    """A Hydra override or YAML file that does not fit the schema (unknown key, wrong type, unknown preset)."""


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved, typed config for these Hydra overrides (e.g. ["model=gpt_350m", "parallel.tp=2"])."""
    register()
    user_config_dir()  # a bad $BIGSCIENCE_CONFIG_DIR is a FileNotFoundError here, not a Hydra traceback
    Plugins.instance().register(UserConfigDir)
    try:
        with initialize_config_module(version_base="1.3", config_module=CONFIG_PACKAGE):
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
