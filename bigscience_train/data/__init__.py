"""Training data: tokenizer, .bin/.idx datasets, blended GPT samples, resumable sampling."""
