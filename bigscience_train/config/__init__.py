"""Typed run configuration: schema, Hydra composition and validation."""

from bigscience_train.config.load import OverrideError, load_config, load_config_file, to_yaml
from bigscience_train.config.schema import RunConfig
from bigscience_train.config.validate import (
    ConfigError,
    cluster_world_size,
    config_problems,
    data_parallel_size,
    padded_vocab_size,
    validate,
)
from bigscience_train.data.blend import parse_blend

__all__ = [
    "ConfigError",
    "cluster_world_size",
    "OverrideError",
    "RunConfig",
    "config_problems",
    "data_parallel_size",
    "load_config",
    "load_config_file",
    "padded_vocab_size",
    "parse_blend",
    "to_yaml",
    "validate",
]
