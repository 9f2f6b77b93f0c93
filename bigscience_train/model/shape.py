"""The model's shape: the one definition of its architecture fields, free of torch and of any config system.

The run config's `model` section is this dataclass plus a preset name and the vocabulary padding rule
(config/schema.py, ModelConfig), so a field declared here is a config key too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Position(str, Enum):
    alibi = "alibi"
    learned = "learned"
    rotary = "rotary"


class AttentionKernel(str, Enum):
    # torch's scaled_dot_product_attention, any device.
    sdpa = "sdpa"
    # FlexAttention, compiled: ALiBi computed in the kernel and masked blocks skipped; GPUs only (torch has no
    # CPU backward for it) and no attention dropout.
    flex = "flex"


@dataclass
class GPTShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    seq_length: int
    # Rows of the embedding. In the run config, the tokenizer's vocabulary, which the layout pads (Megatron's
    # rule) before building the model; the model itself takes it as it is.
    vocab_size: int = 50257
    position: Position = Position.alibi
    embedding_layernorm: bool = True
    tie_embeddings: bool = True
    layernorm_epsilon: float = 1e-5
    init_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    rotary_base: float = 10000.0
    attention: AttentionKernel = AttentionKernel.sdpa

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def shape_fields(source) -> GPTShape:
    """A plain GPTShape from any object with its fields (a ModelConfig, its DictConfig, another shape)."""
    return GPTShape(**{name: getattr(source, name) for name in GPTShape.__dataclass_fields__})
