"""Raw corpus to tokenizer to Megatron .bin/.idx datasets."""
