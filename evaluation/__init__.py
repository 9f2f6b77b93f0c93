"""Zero-shot evaluation: lm-eval over our checkpoints (any layout) and Hugging Face BLOOM-style directories."""
