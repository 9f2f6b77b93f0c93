"""A tiktoken encoder built from a byte-level BPE tokenizer.json: the same ids as Hugging Face tokenizers,
several times faster (benchmarks/preprocess).

The conversion is exact only for plain byte-level BPE with the GPT-2 split regex; `build_encoder` checks
that first from the tokenizer's components, then compares ids against `tokenizers` on sample texts, and falls back to
`tokenizers` with the reason when either check fails.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from bigscience_train.data.tokenizer import Tokenizer

# The GPT-2 pre-tokenization regex, as HF's ByteLevel(use_regex=True) applies it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

Encode = Callable[[list[str]], list[list[int]]]


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes stand for
    themselves, the other 68 bytes take the code points from 256 upwards in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _name(component) -> str | None:
    return None if component is None else type(component).__name__


def _byte_level_bpe(hf) -> str | None:
    """None when the tokenizer is plain byte-level BPE with the GPT-2 regex, else why it is not."""
    model, pre = hf.model, hf.pre_tokenizer
    if _name(model) != "BPE":
        return f"model type {_name(model)} is not BPE"
    if hf.normalizer is not None:
        return f"normalizer {_name(hf.normalizer)} is not supported"
    if _name(pre) != "ByteLevel" or not pre.use_regex or pre.add_prefix_space:
        return f"pre-tokenizer {_name(pre)} is not ByteLevel(use_regex=True, add_prefix_space=False)"
    if model.dropout or model.continuing_subword_prefix or model.end_of_word_suffix:
        return "BPE dropout or subword affixes are not supported"
    return None


def tiktoken_encoding(tokenizer: Tokenizer):
    """The tiktoken Encoding of a byte-level BPE tokenizer, or the reason it cannot be built. Read from the
    loaded tokenizer rather than its JSON, which would be parsed a second time."""
    import tiktoken

    reason = _byte_level_bpe(tokenizer.hf)
    if reason:
        return None, reason
    special = {t.content for t in tokenizer.hf.get_added_tokens_decoder().values()}
    vocab = {t: i for t, i in tokenizer.hf.get_vocab(with_added_tokens=False).items() if t not in special}
    to_byte = {c: chr(b) for b, c in byte_to_unicode().items()}
    if not set("".join(vocab)) <= to_byte.keys():
        return None, "the vocabulary has tokens outside the byte-level alphabet"
    # str.translate then latin-1 turn a token's characters back into its bytes in C, not one by one in Python.
    table = str.maketrans(to_byte)
    ranks = {token.translate(table).encode("latin-1"): i for token, i in vocab.items()}
    if len(ranks) < 256 or any(bytes([b]) not in ranks for b in range(256)):
        return None, "the vocabulary lacks some of the 256 single bytes"
    encoding = tiktoken.Encoding(
        name=tokenizer.path.stem, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    return encoding, None


class FastEncoder:
    """tiktoken for the text, tokenizers for the rare document that spells out a special token."""

    def __init__(self, encoding, tokenizer: Tokenizer):
        self.encoding, self.tokenizer = encoding, tokenizer
        self.specials = [t.content for t in tokenizer.hf.get_added_tokens_decoder().values()]

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [
            self.tokenizer.encode_batch([t])[0]
            if any(s in t for s in self.specials)
            else self.encoding.encode_ordinary(t)
            for t in texts
        ]


def build_encoder(tokenizer: Tokenizer, sample: list[str], fast: bool = True) -> tuple[Encode, str]:
    """The fastest encoder giving the same ids as `tokenizers` on `sample`, and a line saying which it is."""
    if not fast:
        return tokenizer.encode_batch, "tokenizers (fast encoder disabled)"
    try:
        encoding, reason = tiktoken_encoding(tokenizer)
    except ImportError:
        encoding, reason = None, "tiktoken is not installed"
    if encoding is None:
        return tokenizer.encode_batch, f"tokenizers (no fast encoder: {reason})"
    encoder = FastEncoder(encoding, tokenizer)
    if encoder(sample) != tokenizer.encode_batch(sample):
        return tokenizer.encode_batch, "tokenizers (the fast encoder gave other ids on the sample)"
    return encoder, f"tiktoken (ids identical to tokenizers on {len(sample)} sample documents)"
