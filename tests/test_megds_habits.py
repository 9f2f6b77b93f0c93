"""Megatron-DeepSpeed habits: GPT-2 --vocab-file/--merge-file tokenizers, and the document flags
(data.eod_mask_loss, data.reset_position_ids, data.reset_attention_mask)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.implementations import ByteLevelBPETokenizer

from bigscience_train.cli import main
from bigscience_train.config import ConfigError, load_config, validate
from bigscience_train.data.gpt_data import build_splits, collate, document_ids
from bigscience_train.data.tokenizer import Tokenizer
from bigscience_train.model import positions
from bigscience_train.model.attention import _flex, causal_mask, within_documents
from bigscience_train.model.gpt import GPT
from bigscience_train.model.shape import GPTShape
from bigscience_train.parallel.env import init_parallel
from bigscience_train.parallel.loss import masked_lm_loss_sum
from bigscience_train.train.loop import Trainer
from data_tools.corpus import stdlib_sources, write_jsonl
from data_tools.fast_encoder import build_encoder
from data_tools.preprocess import preprocess
from data_tools.tokenizer_train import train_tokenizer
from tests.conftest import read_metrics, run_cli

FLAGS = ["data.eod_mask_loss=true", "data.reset_position_ids=true", "data.reset_attention_mask=true"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> dict:
    """Short documents (a few stdlib lines each, so that 64-token samples hold several), a 400-token BPE
    tokenizer.json trained on them, its vocab.json and merges.txt, and the corpus preprocessed with those."""
    d = tmp_path_factory.mktemp("gpt2")
    lines = [line for path in stdlib_sources()[:12] for line in path.read_text().splitlines() if line.strip()]
    corpus = d / "corpus.jsonl"
    write_jsonl(({"text": "\n".join(lines[i : i + 2])} for i in range(0, 1200, 2)), corpus)
    tokenizer = d / "tokenizer.json"
    train_tokenizer([str(corpus)], tokenizer, vocab_size=400, show_progress=False)
    vocab, merges = HFTokenizer.from_file(str(tokenizer)).model.save(str(d))
    prefix = str(d / "gpt2_text_document")
    args = ["data", "preprocess", "--input", str(corpus), "--output-prefix", prefix, "--append-eod"]
    assert main([*args, "--vocab-file", vocab, "--merge-file", merges]) == 0
    return {
        "dir": d,
        "corpus": corpus,
        "tokenizer": str(tokenizer),
        "vocab": vocab,
        "merges": merges,
        "prefix": prefix,
    }


def texts(gpt2: dict, n: int = 40) -> list[str]:
    return [json.loads(line)["text"] for line in gpt2["corpus"].read_text().splitlines()[:n]]


def test_gpt2_files_tokenize_as_the_tokenizer_json(gpt2):
    ours = Tokenizer(vocab_file=gpt2["vocab"], merge_file=gpt2["merges"])
    reference = Tokenizer(gpt2["tokenizer"])
    sample = texts(gpt2) + ["naïve café ünïcode  spaces\t\ttabs\n\n", "x = 1_000 + 'é'"]
    assert ours.encode_batch(sample) == reference.encode_batch(sample)
    assert (ours.eod, ours.vocab_size) == (reference.eod, reference.vocab_size) and ours.eod == 0
    assert ours.decode(ours.encode_batch(sample[:1])[0]) == sample[0]
    # As Megatron's GPT2BPETokenizer: a document spelling out <|endoftext|> is text, and there is no pad.
    library = ByteLevelBPETokenizer.from_file(gpt2["vocab"], gpt2["merges"])
    spelled = "end<|endoftext|>"
    assert (
        ours.encode_batch([spelled])[0] == library.encode(spelled).ids
        and ours.eod not in library.encode(spelled).ids
    )
    assert ours.pad == -1 and ours.unique_identifiers != reference.unique_identifiers
    # What `bigscience ckpt export-hf` writes for it: a tokenizer.json with the same ids.
    ours.save_json(gpt2["dir"] / "exported.json")
    exported = HFTokenizer.from_file(str(gpt2["dir"] / "exported.json"))
    assert [e.ids for e in exported.encode_batch(sample)] == ours.encode_batch(sample)
    encode, description = build_encoder(ours, sample)
    assert description.startswith("tiktoken") and encode(sample) == ours.encode_batch(sample)
    # The preprocessed corpus (fixture, through the CLI) holds the ids the tokenizer.json gives.
    again = str(gpt2["dir"] / "json_text_document")
    preprocess([str(gpt2["corpus"])], again, gpt2["tokenizer"], progress=False)
    for suffix in (".bin", ".idx"):
        assert Path(gpt2["prefix"] + suffix).read_bytes() == Path(again + suffix).read_bytes()
    with pytest.raises(ValueError, match="needs both a vocab file and a merge file"):
        Tokenizer(vocab_file=gpt2["vocab"])
    with pytest.raises(ValueError, match="not both or neither"):
        Tokenizer(gpt2["tokenizer"], gpt2["vocab"], gpt2["merges"])
    with pytest.raises(FileNotFoundError, match="merge file /nonexistent.txt does not exist"):
        Tokenizer(vocab_file=gpt2["vocab"], merge_file="/nonexistent.txt")
    both = ["--tokenizer", gpt2["tokenizer"], "--vocab-file", gpt2["vocab"], "--merge-file", gpt2["merges"]]
    assert main(["data", "preprocess", "--input", "x", "--output-prefix", "y", *both]) == 2


def run_overrides(gpt2: dict, run_dir, *extra: str) -> list[str]:
    return [
        "model=gpt_tiny",
        "model.position=rotary",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.iters=4",
        "train.eval_interval=2",
        "train.eval_iters=1",
        "logging.log_interval=1",
        "optim.lr=3e-3",
        f"data.blend=[{gpt2['prefix']}]",
        "data.tokenizer=null",
        f"data.vocab_file={gpt2['vocab']}",
        f"data.merge_file={gpt2['merges']}",
        f"data.cache_dir={gpt2['dir'] / 'cache'}",
        "data.split='90,9,1'",
        f"run_dir={run_dir}",
        "logging.tensorboard=false",
        "logging.progress=plain",
        "logging.carbon=false",
        *extra,
    ]


def test_tokenizer_config_rules(gpt2, tmp_path):
    both = load_config([*run_overrides(gpt2, tmp_path), f"data.tokenizer={gpt2['tokenizer']}"])
    one = load_config([*run_overrides(gpt2, tmp_path), "data.merge_file=null"])
    missing = load_config([*run_overrides(gpt2, tmp_path), "data.vocab_file=/nonexistent.json"])
    with pytest.raises(
        ConfigError, match="data.tokenizer and data.vocab_file and data.merge_file are both set"
    ):
        validate(both)
    with pytest.raises(ConfigError, match="data.vocab_file needs data.merge_file too"):
        validate(one)
    with pytest.raises(ConfigError, match="data.vocab_file: no such file /nonexistent.json"):
        validate(missing, check_files=True)


@pytest.fixture(scope="module")
def flagged_run(gpt2, tmp_path_factory):
    """One process, GPT-2 files, rotary positions and every document flag on."""
    run = tmp_path_factory.mktemp("flagged") / "run"
    cfg = load_config(run_overrides(gpt2, run, *FLAGS))
    validate(cfg, world_size=1, check_files=True)
    result = Trainer(cfg, init_parallel()).run()
    assert result.stop_reason == "iters"
    return run


def test_eod_mask_loss_and_position_and_document_ids(gpt2, tmp_path):
    cfg = load_config(run_overrides(gpt2, tmp_path, *FLAGS))
    tok = Tokenizer.from_config(cfg.data)
    splits = build_splits(cfg.data, 64, tok, (40, 4, None))
    batch = collate(splits.train, list(range(40)))
    tokens, eod = batch["tokens"], batch["tokens"] == tok.eod
    assert eod.any(-1).sum() >= 30 and eod.sum(-1).max() >= 2  # samples cross documents
    assert torch.equal(batch["loss_mask"] == 0, eod)
    docs = batch["document_ids"]
    assert torch.equal(docs, document_ids(tokens, tok.eod))
    for row in range(len(tokens)):
        ends = eod[row].nonzero().flatten().tolist()
        starts = [0] + [i + 1 for i in ends if i + 1 < 64]
        expected = torch.cat([torch.arange(b - a) for a, b in zip(starts, starts[1:] + [64], strict=True)])
        assert torch.equal(batch["position_ids"][row], expected)
        # An EOD ends its own document; the next token starts a new one.
        assert all(docs[row, i] == docs[row, i - 1] for i in ends if i > 0)
        assert all(docs[row, i + 1] == docs[row, i] + 1 for i in ends if i + 1 < 64)
    plain = collate(
        build_splits(load_config(run_overrides(gpt2, tmp_path)).data, 64, tok, (40, 4, None)).train, [0]
    )
    assert set(plain) == {"tokens", "labels", "loss_mask"} and bool(plain["loss_mask"].all())


def model(position: str) -> GPT:
    torch.manual_seed(0)
    shape = GPTShape(
        num_layers=2, hidden_size=64, num_heads=4, seq_length=32, vocab_size=256, position=position
    )
    return GPT(shape).eval()


# A 2-document sample: document A (10 tokens, the last an EOD = 0) then document B (22 tokens).
A = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(1)).index_fill_(
    1, torch.tensor([9]), 0
)
B = torch.randint(1, 256, (1, 22), generator=torch.Generator().manual_seed(2))
SAMPLE = torch.cat([A, B], 1)
DOCS = document_ids(SAMPLE, 0)
RESET = torch.cat([torch.arange(10), torch.arange(22)])[None]


@torch.no_grad()
def test_learned_positions_restart_after_eod():
    m = model("learned")
    labels, mask = torch.roll(SAMPLE, -1, 1), torch.ones(1, 32)
    loss = masked_lm_loss_sum(m(SAMPLE), labels, mask)[0]
    reset = masked_lm_loss_sum(m(SAMPLE, position_ids=RESET), labels, mask)[0]
    assert reset != loss
    fused = m(SAMPLE, labels=labels, loss_mask=mask, position_ids=RESET)[0]  # train.fused_output_loss
    assert torch.allclose(fused, reset, atol=1e-4)
    # Embedding by hand: word embedding plus the position embedding of each token's reset position.
    t = m.transformer
    by_hand = t.word_embeddings_layernorm(t.word_embeddings(SAMPLE) + t.position_embeddings.weight[RESET[0]])
    assert torch.allclose(m.embed(SAMPLE, RESET), by_hand, atol=1e-6)
    # Both flags: document B is scored as if it were fed alone, from position 0.
    both = m(SAMPLE, position_ids=RESET, document_ids=DOCS)
    assert torch.allclose(both[:, 10:], m(B), atol=1e-5)
    assert torch.allclose(both[:, :10], m(A), atol=1e-5)
    # The mask alone: B alone, at the positions it holds in the sample.
    masked = m(SAMPLE, document_ids=DOCS)
    assert torch.allclose(masked[:, 10:], m(B, position_ids=torch.arange(10, 32)[None]), atol=1e-5)
    assert not torch.allclose(masked[:, 10:], m(B), atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("position", ["alibi", "rotary"])
def test_attention_stays_within_documents(position):
    m = model(position)
    other = torch.cat(
        [torch.randint(1, 256, (1, 9), generator=torch.Generator().manual_seed(3)), A[:, 9:]], 1
    )
    changed = torch.cat([other, B], 1)
    inputs = {"document_ids": DOCS, "position_ids": RESET if position == "rotary" else None}
    second = m(SAMPLE, **inputs)[:, 10:]
    assert torch.allclose(second, m(changed, **inputs)[:, 10:], atol=1e-6)
    assert torch.allclose(second, m(B), atol=1e-5)
    assert not torch.allclose(m(SAMPLE)[:, 10:], m(changed)[:, 10:], atol=1e-3)


def test_flex_document_mask_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 16) for _ in range(3))
    docs = torch.stack([DOCS[0], torch.zeros(32, dtype=torch.long)])
    cpu = torch.device("cpu")
    for slopes in (positions.alibi_slopes(4), None):
        sdpa = within_documents(causal_mask("sdpa", slopes, 32, torch.float32, cpu), docs)
        flex = within_documents(causal_mask("flex", slopes, 32, torch.float32, cpu), docs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex_attention warns that it is meant to be compiled
            got = _flex(q, k, v, flex)
        assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa), atol=1e-5)


def test_pipeline_matches_one_process(gpt2, flagged_run, tmp_path):
    run = tmp_path / "pp2"
    out = run_cli(["train", *run_overrides(gpt2, run, *FLAGS), "parallel.pp=2"], nproc=2)
    assert out.returncode == 0, out.stderr
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("valid", "val_loss")):
        assert [r[key] for r in read_metrics(run, kind)] == pytest.approx(
            [r[key] for r in read_metrics(flagged_run, kind)], abs=1e-5
        )


def test_eval_reads_the_gpt2_files(gpt2, flagged_run):
    from evaluation.run import expand_short_keys, load_lm

    step = flagged_run / "checkpoints" / "step_0000004"
    cfg = load_config(expand_short_keys([f"checkpoint={step}"]))
    lm = load_lm(step, cfg, [], init_parallel())
    reference = Tokenizer(gpt2["tokenizer"])
    for text in texts(gpt2, 5):
        assert lm.tok_encode(text) == reference.encode_batch([text])[0]
