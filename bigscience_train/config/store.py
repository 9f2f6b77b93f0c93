"""Registers the structured schema with Hydra, so every YAML in configs/ is merged onto typed dataclasses."""

from hydra.core.config_store import ConfigStore

from bigscience_train.config.schema import RunConfig

SCHEMA_NAME = "run_schema"


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)
