"""From the run config to the model's shape (the only place the model meets the config system)."""

import dataclasses
from enum import Enum

from bigscience_train.config.validate import padded_vocab_size
from bigscience_train.model.gpt import GPTShape


def shape_from_config(model_cfg, tp: int = 1) -> GPTShape:
    """GPTShape takes the like-named fields of ModelConfig (choices as plain strings); only the vocabulary is
    padded for TP on the way."""
    values = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(GPTShape)}
    values = {k: str(v.value) if isinstance(v, Enum) else v for k, v in values.items()}
    values["vocab_size"] = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)
    return GPTShape(**values)
