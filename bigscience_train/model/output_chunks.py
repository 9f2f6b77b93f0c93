"""How many tokens the fused output loss takes through the output layer at a time; no torch, so the memory
planner counts the same chunk the model computes."""

# Logits per chunk, and at least 128 tokens so each matmul stays large. A CPU's chunk stays cache-sized; a GPU's is
# larger because each chunk costs some ten kernel launches.
CHUNK_LOGITS = 1 << 22
CHUNK_LOGITS_GPU = 1 << 26
MIN_CHUNK_TOKENS = 128


def chunk_tokens(vocab_size: int, on_gpu: bool = False) -> int:
    return max(MIN_CHUNK_TOKENS, (CHUNK_LOGITS_GPU if on_gpu else CHUNK_LOGITS) // vocab_size)
