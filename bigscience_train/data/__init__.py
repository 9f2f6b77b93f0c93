"""Training data: tokenizer, megatron-core indexed datasets, blended GPT samples, resumable sampling."""
