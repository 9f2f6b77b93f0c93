"""A Hugging Face tokenizer.json, or GPT-2's vocab.json and merges.txt (Megatron's GPT2BPETokenizer), with what
Megatron's datasets ask of a tokenizer (eod, pad, vocab_size)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<eod>")
PAD_CANDIDATES = ("<pad>", "<|padding|>")
GPT2_EOD = "<|endoftext|>"


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def _gpt2_bpe(vocab_file: Path, merge_file: Path) -> HFTokenizer:
    """GPT-2's byte-level BPE: the GPT-2 split regex, no prefix space, and no added tokens, so that a text
    spelling out <|endoftext|> is encoded as text, as Megatron's GPT2BPETokenizer encodes it."""
    try:
        hf = HFTokenizer(models.BPE.from_file(str(vocab_file), str(merge_file)))
    except Exception as e:
        raise ValueError(
            f"{vocab_file} and {merge_file} are not a GPT-2 vocab.json and merges.txt: {e}"
        ) from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


class Tokenizer:
    def __init__(
        self,
        path: str | Path | None = None,
        vocab_file: str | Path | None = None,
        merge_file: str | Path | None = None,
    ):
        """A tokenizer.json at `path`, or a GPT-2 `vocab_file` and `merge_file` pair: exactly one of the two."""
        if (path is None) == (vocab_file is None and merge_file is None):
            raise ValueError(
                "give a tokenizer.json or a GPT-2 vocab file and merge file, not both or neither"
            )
        if path is not None:
            self.path = _existing(path, "tokenizer file")
            self.merge_file: Path | None = None
            self.source = str(self.path)
            try:
                self.hf = HFTokenizer.from_file(str(self.path))
            except Exception as e:
                raise ValueError(f"{self.path} is not a Hugging Face tokenizer.json: {e}") from None
            self.eod = self._first_id(EOD_CANDIDATES, "end-of-document")
            pad = [self.hf.token_to_id(t) for t in PAD_CANDIDATES if self.hf.token_to_id(t) is not None]
            # Megatron masks the loss where labels == pad, so pad must be a token that never occurs in text.
            self.pad = pad[0] if pad else -1
            kind = "Tokenizer"
        else:
            if vocab_file is None or merge_file is None:
                raise ValueError("a GPT-2 tokenizer needs both a vocab file and a merge file")
            self.path = _existing(vocab_file, "vocab file")
            self.merge_file = _existing(merge_file, "merge file")
            self.source = f"{self.path} + {self.merge_file}"
            self.hf = _gpt2_bpe(self.path, self.merge_file)
            self.eod = self._first_id((GPT2_EOD,), "end-of-document")
            # Megatron's GPT2BPETokenizer has no pad token.
            self.pad = -1
            kind = "GPT2BPETokenizer"
        # megatron-core hashes these into the names of its cached sample indices.
        self.unique_identifiers = {
            "class": kind,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "pad": self.pad,
        }

    @classmethod
    def from_config(cls, data_cfg) -> Tokenizer:
        """The tokenizer a run config's data section names (data.tokenizer, or data.vocab_file and
        data.merge_file); a config saved before the GPT-2 files existed has data.tokenizer alone."""
        return cls(data_cfg.get("tokenizer"), data_cfg.get("vocab_file"), data_cfg.get("merge_file"))

    def _first_id(self, candidates: tuple[str, ...], what: str) -> int:
        for token in candidates:
            token_id = self.hf.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(f"{self.source} has no {what} token (looked for {', '.join(candidates)})")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def save_json(self, out: str | Path) -> None:
        """As a Hugging Face tokenizer.json: a copy of the file it was read from, if it was one."""
        if self.merge_file is None:
            shutil.copyfile(self.path, out)
        else:
            self.hf.save(str(out))
