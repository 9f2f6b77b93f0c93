"""The GPT model: no parallel or rank logic here."""

from bigscience_train.model.gpt import GPT, GPTShape, build_on_meta, count_parameters, materialize
from bigscience_train.model.shape import shape_from_config

__all__ = ["GPT", "GPTShape", "build_on_meta", "count_parameters", "materialize", "shape_from_config"]
