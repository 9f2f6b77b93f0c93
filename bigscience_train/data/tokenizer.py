"""A Hugging Face tokenizer.json, with what Megatron's datasets ask of a tokenizer (eod, pad, vocab_size)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<eod>")
PAD_CANDIDATES = ("<pad>", "<|padding|>")


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
        self.path = path
        self.eod = self._first_id(EOD_CANDIDATES, "end-of-document")
        pad = [self.hf.token_to_id(t) for t in PAD_CANDIDATES if self.hf.token_to_id(t) is not None]
        # Megatron masks the loss where labels == pad, so pad must be a token that never occurs in text.
        self.pad = pad[0] if pad else -1
        # megatron-core hashes these into the names of its cached sample indices.
        self.unique_identifiers = {
            "class": "Tokenizer",
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "pad": self.pad,
        }

    def _first_id(self, candidates: tuple[str, ...], what: str) -> int:
        for token in candidates:
            token_id = self.hf.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(f"{self.path} has no {what} token (looked for {', '.join(candidates)})")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)
