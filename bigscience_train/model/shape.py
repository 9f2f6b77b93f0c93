"""From the run config to the model's shape (the only place the model meets the config system)."""

from bigscience_train.config.validate import padded_vocab_size
from bigscience_train.model.gpt import GPTShape


def shape_from_config(model_cfg, tp: int = 1) -> GPTShape:
    return GPTShape(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_heads=model_cfg.num_heads,
        seq_length=model_cfg.seq_length,
        vocab_size=padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp),
        position=str(getattr(model_cfg.position, "value", model_cfg.position)),
        embedding_layernorm=model_cfg.embedding_layernorm,
        tie_embeddings=model_cfg.tie_embeddings,
        layernorm_epsilon=model_cfg.layernorm_epsilon,
        init_std=model_cfg.init_std,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        rotary_base=model_cfg.rotary_base,
    )
