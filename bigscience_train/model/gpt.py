"""Decoder-only GPT with BLOOM's choices, readable in one file.

ALiBi (or learned / rotary positions), layernorm after the word embedding, pre-LN blocks, GeLU MLP of 4h,
output projection tied to the input embedding. Module and parameter names are those of Hugging Face's
BloomForCausalLM, so a state dict maps 1:1. The model knows nothing of ranks: parallelism is applied from
outside (bigscience_train/parallel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigscience_train.model import positions


@dataclass(frozen=True)
class GPTShape:
    """What the model needs to know, free of any config system."""

    num_layers: int
    hidden_size: int
    num_heads: int
    seq_length: int
    vocab_size: int  # already padded
    position: str = "alibi"
    embedding_layernorm: bool = True
    tie_embeddings: bool = True
    layernorm_epsilon: float = 1e-5
    init_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    rotary_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class Attention(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.head_dim = shape.head_dim
        self.attention_dropout = shape.attention_dropout
        self.query_key_value = nn.Linear(shape.hidden_size, 3 * shape.hidden_size)
        self.dense = nn.Linear(shape.hidden_size, shape.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, rope: tuple | None) -> torch.Tensor:
        b, s, _ = x.shape
        # BLOOM's fused layout: per head, [q, k, v] contiguous. The head count is read from the tensor,
        # so a tensor-parallel shard that holds a slice of the heads runs the same code.
        qkv = self.query_key_value(x).view(b, s, -1, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        if rope is not None:
            q, k = positions.apply_rotary(q, *rope), positions.apply_rotary(k, *rope)
        dropout = self.attention_dropout if self.training else 0.0
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(shape.hidden_size, 4 * shape.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * shape.hidden_size, shape.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh approximation: what BLOOM trained with (Megatron's fused bias-GeLU) and what HF Bloom computes.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(shape.hidden_size, eps=shape.layernorm_epsilon)
        self.self_attention = Attention(shape)
        self.post_attention_layernorm = nn.LayerNorm(shape.hidden_size, eps=shape.layernorm_epsilon)
        self.mlp = MLP(shape)
        self.dropout = nn.Dropout(shape.hidden_dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, rope: tuple | None) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.input_layernorm(x), bias, rope))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.word_embeddings = nn.Embedding(shape.vocab_size, shape.hidden_size)
        if shape.position == "learned":
            self.position_embeddings = nn.Embedding(shape.seq_length, shape.hidden_size)
        if shape.embedding_layernorm:
            self.word_embeddings_layernorm = nn.LayerNorm(shape.hidden_size, eps=shape.layernorm_epsilon)
        self.embedding_dropout = nn.Dropout(shape.hidden_dropout)
        # A ModuleDict keyed "0".."L-1" keeps HF's names (h.3.mlp...) and lets a pipeline stage drop layers
        # without renumbering the ones it keeps.
        self.h = nn.ModuleDict({str(i): Block(shape) for i in range(shape.num_layers)})
        self.ln_f = nn.LayerNorm(shape.hidden_size, eps=shape.layernorm_epsilon)


class GPT(nn.Module):
    def __init__(self, shape: GPTShape, device: torch.device | str | None = None):
        """Built on the meta device, then (unless `device` is meta) allocated on `device` and initialised,
        so the weights depend on the seed alone, never on how the model was constructed."""
        super().__init__()
        self.shape = shape
        with torch.device("meta"):
            self.transformer = Transformer(shape)
            self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
            self.register_buffer("alibi_slopes", torch.empty(shape.num_heads), persistent=False)
            self.register_buffer("rotary_inv_freq", torch.empty(shape.head_dim // 2), persistent=False)
        self._tie_embeddings()
        device = torch.device(device) if device is not None else torch.get_default_device()
        if device.type != "meta":
            materialize(self, device)

    def _tie_embeddings(self) -> None:
        if self.shape.tie_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Megatron's init: N(0, std) weights, output projections scaled by 1/sqrt(2 * layers), zero biases.

        Call after building on the meta device and `to_empty(device=...)`: it also re-ties the embeddings
        (to_empty replaces parameters) and fills the non-persistent buffers.
        """
        std = self.shape.init_std
        out_std = std / math.sqrt(2.0 * self.shape.num_layers)
        self._tie_embeddings()
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith(("self_attention.dense", "mlp.dense_4h_to_h"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        self.alibi_slopes.copy_(positions.alibi_slopes(self.shape.num_heads))
        self.rotary_inv_freq.copy_(positions.rotary_inv_freq(self.shape.head_dim, self.shape.rotary_base))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, padded vocab) of next tokens for tokens (batch, seq)."""
        t = self.transformer
        seq_len = tokens.shape[1]
        x = t.word_embeddings(tokens)
        if self.shape.position == "learned":
            x = x + t.position_embeddings(torch.arange(seq_len, device=tokens.device))
        if self.shape.embedding_layernorm:
            x = t.word_embeddings_layernorm(x)
        x = t.embedding_dropout(x)
        bias = rope = None
        if self.shape.position == "alibi":
            # Built in the dtype attention runs in: autocast would otherwise cast a copy in every layer.
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            bias = positions.alibi_causal_bias(self.alibi_slopes, seq_len, dtype)
        elif self.shape.position == "rotary":
            rope = positions.rotary_cos_sin(self.rotary_inv_freq, seq_len, x.dtype)
        for block in t.h.values():
            x = block(x, bias, rope)
        return self.lm_head(t.ln_f(x))


def build_on_meta(shape: GPTShape) -> GPT:
    """The model with no storage: huge presets can be built, inspected and parallelised before allocation."""
    return GPT(shape, device="meta")


def materialize(model: GPT, device: torch.device | str = "cpu") -> GPT:
    """Allocates storage on `device` (uninitialised) and runs init_weights()."""
    model.to_empty(device=device)
    model.init_weights()
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each, however often they are tied."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
