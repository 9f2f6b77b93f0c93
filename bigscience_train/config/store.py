"""Registers the structured schema with Hydra: every YAML of the config tree merges onto its dataclasses."""

from hydra.core.config_store import ConfigStore

from bigscience_train.config.schema import RunConfig

SCHEMA_NAME = "run_schema"


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)
