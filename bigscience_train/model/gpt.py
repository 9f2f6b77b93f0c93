"""Decoder-only GPT with BLOOM's choices, readable in one file.

ALiBi (or learned / rotary positions), layernorm after the word embedding, pre-LN blocks, GeLU MLP of 4h,
output projection tied to the input embedding. Module and parameter names are those of Hugging Face's
BloomForCausalLM, so a state dict maps 1:1. The model knows nothing of ranks: parallelism is applied from
outside (bigscience_train/parallel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigscience_train.model import positions
from bigscience_train.model.attention import AttentionMask, causal_attention, causal_mask, within_documents
from bigscience_train.model.init import LocalPart, normal_part, whole
from bigscience_train.model.output_loss import matmul_dtype, output_layer_loss
from bigscience_train.model.shape import GPTShape


class Attention(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.head_dim = shape.head_dim
        self.attention_dropout = shape.attention_dropout
        self.query_key_value = nn.Linear(shape.hidden_size, 3 * shape.hidden_size)
        self.dense = nn.Linear(shape.hidden_size, shape.hidden_size)

    def forward(self, x: torch.Tensor, mask: AttentionMask, rope: tuple | None) -> torch.Tensor:
        b, s, _ = x.shape
        # BLOOM's fused layout: per head, [q, k, v] contiguous. The head count is read from the tensor,
        # so a tensor-parallel shard that holds a slice of the heads runs the same code.
        qkv = self.query_key_value(x).view(b, s, -1, 3, self.head_dim)
        dropout = self.attention_dropout if self.training else 0.0
        out = causal_attention(qkv, mask, rope, dropout)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(shape.hidden_size, 4 * shape.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * shape.hidden_size, shape.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GeLU's tanh approximation: what BLOOM trained with (Megatron's fused bias-GeLU) and HF Bloom computes.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(shape.hidden_size, eps=shape.layernorm_epsilon)
        self.self_attention = Attention(shape)
        self.post_attention_layernorm = nn.LayerNorm(shape.hidden_size, eps=shape.layernorm_epsilon)
        self.mlp = MLP(shape)
        self.dropout = nn.Dropout(shape.hidden_dropout)

    def forward(self, x: torch.Tensor, mask: AttentionMask, rope: tuple | None) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.input_layernorm(x), mask, rope))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


# The modules before the first block: a pipeline's first stage holds them.
EMBEDDING_MODULES = ("word_embeddings", "position_embeddings", "word_embeddings_layernorm")
# What a batch may hold for forward() besides its tokens (Megatron's document flags): every pipeline stage
# takes them.
BATCH_INPUTS = ("position_ids", "document_ids")


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
    def __init__(self, shape: GPTShape, device: torch.device | str | None = None, seed: int = 0):
        """Built on the meta device, then (unless `device` is meta) allocated on `device` and initialised,
        so the weights depend on the seed alone, never on how the model was constructed."""
        super().__init__()
        self.shape = shape
        # Sequence parallelism hands hidden states split along the sequence into this many parts.
        self.sequence_shards = 1
        # The attention heads whose ALiBi slopes this model holds: all of them unless tensor-parallel.
        self.local_heads = range(shape.num_heads)
        self.mask_cache: tuple | None = None
        with torch.device("meta"):
            self.transformer = Transformer(shape)
            self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
            self.register_buffer("alibi_slopes", torch.empty(shape.num_heads), persistent=False)
            self.register_buffer("rotary_inv_freq", torch.empty(shape.head_dim // 2), persistent=False)
        self._tie_embeddings()
        device = torch.device(device) if device is not None else torch.get_default_device()
        if device.type != "meta":
            materialize(self, device, seed)

    def _tie_embeddings(self) -> None:
        # A pipeline's last stage holds the output layer without the embedding: its own copy, kept equal
        # by summing both copies' gradients (bigscience_train/parallel/pipeline.py).
        if (
            self.shape.tie_embeddings
            and self.lm_head is not None
            and self.transformer.word_embeddings is not None
        ):
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def keep_layers(self, layers: range) -> GPT:
        """Keeps only the blocks in `layers`, as a pipeline stage does: the embedding goes unless `layers`
        starts at the first block, the final layernorm and output layer unless it ends at the last. forward()
        then takes hidden states instead of tokens, or returns them instead of logits."""
        t = self.transformer
        t.h = nn.ModuleDict({str(i): t.h[str(i)] for i in layers})
        if layers.start > 0:
            for name in EMBEDDING_MODULES:
                if hasattr(t, name):
                    setattr(t, name, None)
        if layers.stop < self.shape.num_layers:
            t.ln_f = self.lm_head = None
        return self

    @torch.no_grad()
    def init_weights(self, seed: int = 0, local_part: LocalPart = whole) -> None:
        """Megatron's init: N(0, std) weights, output projections scaled by 1/sqrt(2 * layers), zero biases.

        Call after building on the meta device and `to_empty(device=...)`: it also re-ties the embeddings
        (to_empty replaces parameters) and fills the non-persistent buffers. `local_part` gives the part of
        each parameter this process holds and where it sits (model/init.py): a sharded parameter gets the
        values the whole one has there.
        """
        std = self.shape.init_std
        out_std = std / math.sqrt(2.0 * self.shape.num_layers)
        self.init_for_loading()

        def normal_(weight: torch.Tensor, name: str, std: float) -> None:
            local, offset = local_part(weight)
            normal_part(local, weight.shape, offset, std, seed, name)

        def fill_(param: torch.Tensor, value: float) -> None:
            local_part(param)[0].fill_(value)

        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith(("self_attention.dense", "mlp.dense_4h_to_h"))
                tied = module is self.lm_head and self.shape.tie_embeddings
                weight_name = "transformer.word_embeddings.weight" if tied else f"{name}.weight"
                normal_(module.weight, weight_name, out_std if is_output else std)
                if module.bias is not None:
                    fill_(module.bias, 0.0)
            elif isinstance(module, nn.Embedding):
                normal_(module.weight, f"{name}.weight", std)
            elif isinstance(module, nn.LayerNorm):
                fill_(module.weight, 1.0)
                fill_(module.bias, 0.0)

    def init_for_loading(self) -> None:
        """What init_weights does besides drawing values, for a model whose every weight is loaded next
        (after `to_empty`): re-ties the embeddings and fills the non-persistent buffers."""
        self._tie_embeddings()
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        heads = self.local_heads
        self.alibi_slopes.copy_(positions.alibi_slopes(self.shape.num_heads)[heads.start : heads.stop])
        self.rotary_inv_freq.copy_(positions.rotary_inv_freq(self.shape.head_dim, self.shape.rotary_base))

    def hold_heads(self, heads: range) -> None:
        """Keeps the ALiBi slopes of only these attention heads (a tensor-parallel rank's)."""
        self.local_heads = heads
        slopes = self.alibi_slopes
        self.register_buffer("alibi_slopes", slopes[heads.start : heads.stop].clone(), persistent=False)

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        t = self.transformer
        x = t.word_embeddings(tokens)
        if self.shape.position == "learned":
            if position_ids is None:
                position_ids = torch.arange(tokens.shape[1], device=tokens.device)
            x = x + t.position_embeddings(position_ids)
        if self.shape.embedding_layernorm:
            x = t.word_embeddings_layernorm(x)
        return t.embedding_dropout(x)

    def _attention_mask(self, seq_len: int, dtype: torch.dtype, device: torch.device) -> AttentionMask:
        """The mask of every block, kept from one forward to the next: an ALiBi bias is (heads, seq, seq)."""
        slopes = self.alibi_slopes if self.shape.position == "alibi" else None
        # The slopes' storage and version: a new buffer (tensor parallelism slices it per rank) or an in-place
        # change makes a new bias.
        key = (seq_len, dtype, device, None if slopes is None else (slopes.data_ptr(), slopes._version))
        if self.mask_cache is None or self.mask_cache[0] != key:
            # Not an inference tensor, even when first built under inference_mode: training saves it for
            # backward.
            with torch.inference_mode(False):
                mask = causal_mask(self.shape.attention, slopes, seq_len, dtype, device)
                self.mask_cache = (key, mask)
        return self.mask_cache[1]

    def forward(
        self,
        x: torch.Tensor,
        logits_at: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, seq, padded vocab) of next tokens for tokens (batch, seq). A pipeline stage
        (keep_layers) without the embedding takes hidden states, one without the output layer returns them.

        logits_at: flat indices into batch x seq of the only positions to take through the output layer;
        the logits are then (len(logits_at), vocab). Scoring a few positions per row skips most of the
        output layer's work. Not with sequence-parallel hidden states (each rank holds a slice of the rows).

        labels and loss_mask (batch, seq): returns (sum of the masked tokens' losses, their count) instead,
        through the fused output layer and loss (output_loss.py), without whole logits. Not with a
        vocab-parallel output layer.

        position_ids (batch, seq): each token's position for learned and rotary positions (0..seq-1 when
        None); ALiBi's bias depends on distances only. document_ids (batch, seq): each token's document in its
        sample, when attention must not cross documents; None: one causal mask over the whole sample."""
        t = self.transformer
        if t.word_embeddings is not None:
            seq_len = x.shape[1]
            x = self.embed(x, position_ids)
        else:
            seq_len = x.shape[1] * self.sequence_shards
        # An ALiBi bias is built in the dtype attention runs in: autocast would cast it in every layer.
        mask = self._attention_mask(seq_len, matmul_dtype(x), x.device)
        if document_ids is not None:
            mask = within_documents(mask, document_ids)
        rope = None
        if self.shape.position == "rotary":
            rope = positions.rotary_cos_sin(self.rotary_inv_freq, seq_len, x.dtype, position_ids)
        for block in t.h.values():
            x = block(x, mask, rope)
        if self.lm_head is None:
            return x
        if labels is not None:
            return output_layer_loss(t.ln_f(x), self.lm_head.weight, labels, loss_mask)
        if logits_at is not None:
            x = x.flatten(0, 1)[logits_at]
        return self.lm_head(t.ln_f(x))


def build_on_meta(shape: GPTShape) -> GPT:
    """The model with no storage: huge presets can be built, inspected and parallelised before allocation."""
    return GPT(shape, device="meta")


def materialize(model: GPT, device: torch.device | str = "cpu", seed: int = 0) -> GPT:
    """Allocates storage on `device` (uninitialised) and runs init_weights(seed)."""
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each, however often they are tied."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
