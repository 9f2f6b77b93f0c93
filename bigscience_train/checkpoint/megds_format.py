"""Megatron-DeepSpeed's checkpoint layout for BLOOM-style GPTs: file names, parameter names and how tensor
parallelism splits each tensor. Plain strings and rules, no torch: shared by the import and an export.

A checkpoint is DeepSpeed's `global_stepN/` of a GPTModelPipe (a DeepSpeed PipelineModule):
- layer_XX-model_YY-model_states.pt: the state dict of pipeline layer XX on tensor-parallel rank YY. Layer 1 is
  the embedding (word_embeddings.weight, word_embeddings.norm.*, position_embeddings.weight), layers 3..L+2
  the transformer layers, layer L+4 the final layernorm (weight, bias); the others are functions.
- mp_rank_MM_model_states.pt: DeepSpeed's metadata (param_shapes, lr_scheduler, global_steps, ...) plus
  Megatron's client state (args, iteration, tokens, RNG states); MM = pp_rank * tp + tp_rank.
- [bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt: data-parallel rank D's flat partition of the fp32 masters
  and Adam moments of model-parallel rank MM.
- A universal checkpoint (DeepSpeed's ds_to_universal): zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, each
  whole (every tp rank and data-parallel partition merged), and the mp_rank files.
Parameters are named as the PipelineModule names them: `tied_modules.embed.<key>` for the embedding (tied to
the output layer, which holds no file of its own), `<layer>.<key>` for the others.
"""

from __future__ import annotations

import re
from enum import Enum

EMBEDDING_LAYER = 1
FIRST_BLOCK_LAYER = 3
TIED_PREFIX = "tied_modules.embed."

LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
MP_RANK_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
OPTIM_FILE = re.compile(r"(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
UNIVERSAL_DIR = "zero"
UNIVERSAL_STATES = {"fp32": "fp32.pt", "exp_avg": "exp_avg.pt", "exp_avg_sq": "exp_avg_sq.pt"}

# The embedding layer's keys, and ours.
EMBEDDING_KEYS = {
    "word_embeddings.weight": "transformer.word_embeddings.weight",
    "word_embeddings.norm.weight": "transformer.word_embeddings_layernorm.weight",
    "word_embeddings.norm.bias": "transformer.word_embeddings_layernorm.bias",
    "position_embeddings.weight": "transformer.position_embeddings.weight",
}
BLOCK_KEYS = (
    "input_layernorm.weight",
    "input_layernorm.bias",
    "self_attention.query_key_value.weight",
    "self_attention.query_key_value.bias",
    "self_attention.dense.weight",
    "self_attention.dense.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
)
FINAL_NORM_KEYS = ("weight", "bias")


class TPSplit(Enum):
    """How tensor parallelism splits a tensor: column-parallel tensors concatenate on dim 0, row-parallel on
    dim 1; layernorms, row-parallel biases and position embeddings are whole on every rank."""

    column = 0
    row = 1
    replicated = None


_ROW = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")
_COLUMN = (
    "word_embeddings.weight",
    "self_attention.query_key_value.weight",
    "self_attention.query_key_value.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
)


def tp_split(key: str) -> TPSplit:
    if key.endswith(_ROW):
        return TPSplit.row
    return TPSplit.column if key.endswith(_COLUMN) else TPSplit.replicated


def final_norm_layer(num_layers: int) -> int:
    return FIRST_BLOCK_LAYER + num_layers + 1


def layer_file(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def mp_rank_file(pp_rank: int, tp_rank: int, tp: int) -> str:
    return f"mp_rank_{pp_rank * tp + tp_rank:02d}_model_states.pt"


def param_name(layer: int, key: str) -> str:
    """The PipelineModule's name of a layer file's key."""
    return TIED_PREFIX + key if layer == EMBEDDING_LAYER else f"{layer}.{key}"


def split_param_name(name: str) -> tuple[int, str]:
    """(layer, key) of a PipelineModule parameter name."""
    if name.startswith(TIED_PREFIX):
        return EMBEDDING_LAYER, name[len(TIED_PREFIX) :]
    layer, _, key = name.partition(".")
    if not layer.isdigit() or not key:
        raise ValueError(f"{name!r} is not a Megatron-DeepSpeed GPTModelPipe parameter name")
    return int(layer), key


def our_name(layer: int, key: str, num_layers: int) -> str:
    """Our (BloomForCausalLM's) name of a Megatron-DeepSpeed parameter; ValueError for one we do not know."""
    last = final_norm_layer(num_layers)
    if layer == EMBEDDING_LAYER and key in EMBEDDING_KEYS:
        return EMBEDDING_KEYS[key]
    if FIRST_BLOCK_LAYER <= layer < FIRST_BLOCK_LAYER + num_layers and key in BLOCK_KEYS:
        return f"transformer.h.{layer - FIRST_BLOCK_LAYER}.{key}"
    if layer == last and key in FINAL_NORM_KEYS:
        return f"transformer.ln_f.{key}"
    raise ValueError(
        f"layer {layer} key {key!r} is not part of a {num_layers}-layer BLOOM as Megatron-DeepSpeed lays it "
        f"out (embedding at layer {EMBEDDING_LAYER}, transformer layers {FIRST_BLOCK_LAYER}.."
        f"{FIRST_BLOCK_LAYER + num_layers - 1}, final layernorm at {last})"
    )
