import gzip
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from bigscience_train.data.indexed import IndexedWriter, open_indexed, token_dtype
from bigscience_train.data.tokenizer import Tokenizer
from data_tools.corpus import write_corpus
from data_tools.fast_encoder import build_encoder
from data_tools.inspect import describe
from data_tools.jsonl import CorpusError
from data_tools.merge import merge
from data_tools.preprocess import preprocess
from tests.conftest import ROOT, run_cli


def megatron_core():
    """megatron-core's indexed_dataset: the reference our reader and writer must match byte for byte."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its import warns that Transformer Engine and apex are absent
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def test_stdlib_corpus_is_real_text(tmp_path):
    out = tmp_path / "c.jsonl"
    n = write_corpus(out)
    assert n > 300
    first = json.loads(out.open().readline())
    assert first["source"].endswith(".py") and len(first["text"]) > 0


def test_folder_corpus(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha")
    (tmp_path / "docs" / "b.txt").write_text("   ")
    assert write_corpus(tmp_path / "o.jsonl", tmp_path / "docs") == 1
    with pytest.raises(FileNotFoundError, match="missing"):
        write_corpus(tmp_path / "o.jsonl", tmp_path / "missing")


def test_tokenizer_has_eod_and_pad(tiny_data):
    tok = Tokenizer(tiny_data["tokenizer"])
    assert tok.vocab_size == 512 and tok.eod == 0 and tok.pad == 1
    ids = tok.encode_batch(["def f(x):\n    return x"])[0]
    assert tok.decode(ids) == "def f(x):\n    return x"


def test_preprocess_round_trips_through_megatron_reader(tiny_data):
    tok = Tokenizer(tiny_data["tokenizer"])
    texts = [json.loads(line)["text"] for line in tiny_data["corpus"].open()]
    ds = megatron_core().IndexedDataset(tiny_data["prefix"])
    assert len(ds) == len(texts)
    assert ds.index.dtype == np.uint16
    for i in (0, len(texts) // 2, len(texts) - 1):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod
        assert ids[:-1] == tok.encode_batch([texts[i]])[0]


def test_order_is_kept_with_several_workers(tiny_data, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    preprocess(
        [str(tiny_data["corpus"])], str(one), tiny_data["tokenizer"], workers=1, batch_size=7, progress=False
    )
    preprocess(
        [str(tiny_data["corpus"])], str(two), tiny_data["tokenizer"], workers=2, batch_size=7, progress=False
    )
    for suffix in (".bin", ".idx"):
        assert Path(f"{one}{suffix}").read_bytes() == Path(f"{two}{suffix}").read_bytes()


def _bad_corpus(path: Path) -> None:
    lines = [
        b'{"text": "good one"}',
        b"{not json",
        b'{"other": "x"}',
        b'{"text": 5}',
        b'{"text": "\xff\xfe"}',
        b'{"text": "   "}',
        b"",
        b'{"text": "good two"}',
    ]
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def test_bad_lines_are_skipped_and_counted(tiny_data, tmp_path):
    corpus = tmp_path / "bad.jsonl.gz"
    _bad_corpus(corpus)
    summary = preprocess([str(corpus)], str(tmp_path / "out"), tiny_data["tokenizer"], progress=False)
    assert summary.documents == 2
    counts = summary.skips.counts
    assert (
        counts["malformed_json"],
        counts["missing_key"],
        counts["non_string"],
        counts["invalid_utf8"],
        counts["empty"],
    ) == (1, 1, 1, 1, 2)
    assert f"{corpus}:2" in summary.skips.positions["malformed_json"]


def test_strict_stops_at_first_bad_line_and_leaves_nothing(tiny_data, tmp_path):
    corpus = tmp_path / "bad.jsonl.gz"
    _bad_corpus(corpus)
    with pytest.raises(CorpusError, match=rf"{corpus}:2: malformed json"):
        preprocess([str(corpus)], str(tmp_path / "out"), tiny_data["tokenizer"], strict=True, progress=False)
    assert list(tmp_path.iterdir()) == [corpus]


def random_documents(vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab_size, size=int(rng.integers(1, 300))) for _ in range(40)]
    docs.insert(7, np.array([], dtype=np.int64))  # an empty document is kept as one of 0 tokens
    docs.append(np.array([0, vocab_size - 1]))
    return docs


@pytest.mark.parametrize("vocab_size", [512, 65499, 65500, 250_680])
def test_writer_is_byte_identical_to_megatron_core(tmp_path, vocab_size):
    mc = megatron_core()
    dtype = token_dtype(vocab_size)
    assert dtype == mc.DType.optimal_dtype(vocab_size)
    docs = random_documents(vocab_size)
    theirs = mc.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for doc in docs:
        theirs.add_document(doc, [len(doc)])
    theirs.finalize(str(tmp_path / "theirs.idx"))
    with IndexedWriter(str(tmp_path / "ours.bin"), dtype) as ours:
        ours.add_documents(np.concatenate(docs[:10]), [len(d) for d in docs[:10]])
        ours.add_documents(np.concatenate(docs[10:]), [len(d) for d in docs[10:]])
        ours.finalize(str(tmp_path / "ours.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes()

    megatron_reads_ours = mc.IndexedDataset(str(tmp_path / "ours"))
    we_read_theirs = open_indexed(str(tmp_path / "theirs"))
    assert len(megatron_reads_ours) == len(we_read_theirs) == we_read_theirs.num_documents == len(docs)
    assert we_read_theirs.dtype == dtype
    for i, doc in enumerate(docs):
        assert megatron_reads_ours[i].tolist() == we_read_theirs[i].tolist() == doc.tolist()
    assert megatron_reads_ours.document_indices.tolist() == we_read_theirs.document_indices.tolist()


def test_writer_without_documents_matches_megatron_core_and_reads_back(tmp_path):
    theirs = megatron_core().IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    theirs.finalize(str(tmp_path / "theirs.idx"))
    with IndexedWriter(str(tmp_path / "ours.bin"), np.uint16) as ours:
        ours.finalize(str(tmp_path / "ours.idx"))
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "theirs.idx").read_bytes()
    assert (tmp_path / "ours.bin").read_bytes() == b""
    empty = open_indexed(str(tmp_path / "ours"))
    assert len(empty) == empty.num_documents == empty.num_tokens == 0


def test_writer_refuses_ids_its_dtype_cannot_hold(tmp_path):
    with IndexedWriter(str(tmp_path / "w.bin"), np.uint16) as writer, pytest.raises(ValueError, match="fit"):
        writer.add_documents(np.array([1, 70_000]), [2])
    with (
        IndexedWriter(str(tmp_path / "w.bin"), np.uint16) as writer,
        pytest.raises(ValueError, match="add up"),
    ):
        writer.add_documents(np.array([1, 2]), [3])


def test_data_tools_import_neither_torch_nor_megatron():
    code = (
        "import sys\n"
        "import bigscience_train.data, data_tools.preprocess, data_tools.merge, data_tools.inspect\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'transformers'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_missing_dataset_file_is_reported_with_its_name(tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/nope.idx"):
        open_indexed(str(tmp_path / "nope"))
    Path(f"{tmp_path}/half.idx").write_bytes(Path(tiny_data["prefix"] + ".idx").read_bytes())
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/half.bin"):
        open_indexed(str(tmp_path / "half"))


def test_truncated_bin_is_reported_with_its_name(tiny_data, tmp_path):
    prefix = tmp_path / "copy"
    Path(f"{prefix}.idx").write_bytes(Path(tiny_data["prefix"] + ".idx").read_bytes())
    Path(f"{prefix}.bin").write_bytes(Path(tiny_data["prefix"] + ".bin").read_bytes()[:-10])
    with pytest.raises(
        ValueError, match=rf"{prefix}.bin has \d+ bytes but its index describes \d+ \(truncated\)"
    ):
        open_indexed(str(prefix))
    Path(f"{prefix}.idx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"{prefix}.idx is not a valid Megatron index: bad header"):
        open_indexed(str(prefix))
    whole = Path(tiny_data["prefix"] + ".idx").read_bytes()
    Path(f"{prefix}.idx").write_bytes(whole[:-8])
    with pytest.raises(ValueError, match=rf"{prefix}.idx is not a valid Megatron index: \d+ bytes where"):
        open_indexed(str(prefix))


def test_inspect_describes_and_decodes(tiny_data):
    text = describe(tiny_data["prefix"], tiny_data["tokenizer"], sample=1)
    assert "60 documents" in text and "sample 1" in text and "<|endoftext|>" in text


def test_cli_pipeline(tmp_path):
    corpus, tok, prefix = tmp_path / "c.jsonl", tmp_path / "t.json", tmp_path / "p"
    (tmp_path / "docs").mkdir()
    for i in range(5):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document number {i} " * 20)
    assert (
        run_cli(["data", "corpus", "--output", str(corpus), "--folder", str(tmp_path / "docs")]).returncode
        == 0
    )
    assert (
        run_cli(
            ["data", "tokenizer", "--input", str(corpus), "--output", str(tok), "--vocab-size", "300"]
        ).returncode
        == 0
    )
    out = run_cli(
        [
            "data",
            "preprocess",
            "--input",
            str(corpus),
            "--output-prefix",
            str(prefix),
            "--tokenizer",
            str(tok),
            "--append-eod",
            "--workers",
            "2",
        ]
    )
    assert out.returncode == 0, out.stderr
    assert "documents: 5" in out.stdout
    missing = run_cli(
        [
            "data",
            "preprocess",
            "--input",
            str(tmp_path / "nope.jsonl"),
            "--output-prefix",
            str(prefix),
            "--tokenizer",
            str(tok),
        ]
    )
    assert missing.returncode == 2 and "nope.jsonl does not exist" in missing.stderr


def test_shards_merged_in_order_equal_the_whole(tiny_data, tmp_path):
    corpus = [str(tiny_data["corpus"])]
    whole = str(tmp_path / "whole")
    preprocess(corpus, whole, tiny_data["tokenizer"], progress=False)
    shards = [str(tmp_path / f"shard{i}") for i in range(3)]
    for i, prefix in enumerate(shards):
        preprocess(corpus, prefix, tiny_data["tokenizer"], shard=i, num_shards=3, progress=False, workers=2)
    merged = str(tmp_path / "merged")
    documents, _ = merge(shards, merged)
    assert documents == 60
    for suffix in (".bin", ".idx"):
        assert Path(merged + suffix).read_bytes() == Path(whole + suffix).read_bytes()


def test_merge_refuses_mixed_token_types(tiny_data, tmp_path):
    prefix = str(tmp_path / "wide")
    with IndexedWriter(prefix + ".bin", np.int32) as writer:
        writer.add_documents(np.array([1, 2, 3]), [3])
        writer.finalize(prefix + ".idx")
    with pytest.raises(ValueError, match="holds int32 tokens but .* holds uint16"):
        merge([tiny_data["prefix"], prefix], str(tmp_path / "out"))
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_fast_encoder_matches_tokenizers_and_falls_back(tiny_data, tmp_path):
    texts = [json.loads(line)["text"] for line in tiny_data["corpus"].open()]
    texts.append("text that spells <|endoftext|> out")
    encode, description = build_encoder(Tokenizer(tiny_data["tokenizer"]), texts[:8])
    assert description.startswith("tiktoken")
    assert encode(texts) == Tokenizer(tiny_data["tokenizer"]).encode_batch(texts)

    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    word_level = HF(models.WordLevel({"<|endoftext|>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "word_level.json"
    word_level.save(str(path))
    encode, description = build_encoder(Tokenizer(path), ["a b"])
    assert description == "tokenizers (no fast encoder: model type WordLevel is not BPE)"
    assert encode(["a a"]) == [[1, 1]]


def test_zstd_input(tiny_data, tmp_path):
    import zstandard

    raw = tiny_data["corpus"].read_bytes()
    compressed = tmp_path / "corpus.jsonl.zst"
    compressed.write_bytes(zstandard.ZstdCompressor().compress(raw))
    preprocess([str(tmp_path / "*.zst")], str(tmp_path / "z"), tiny_data["tokenizer"], progress=False)
    assert Path(f"{tmp_path}/z.bin").read_bytes() == Path(tiny_data["prefix"] + ".bin").read_bytes()
