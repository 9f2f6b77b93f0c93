"""bigscience_train: pretrain BLOOM-style GPT models with tensor, pipeline and data parallelism."""

__version__ = "0.1.0"
