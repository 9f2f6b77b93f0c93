import numpy as np
import pytest

from bigscience_train.config import load_config
from bigscience_train.data.gpt_data import build_splits
from bigscience_train.data.indexed import IndexedWriter
from bigscience_train.data.tokenizer import Tokenizer
from bigscience_train.parallel.env import init_parallel


@pytest.fixture(autouse=True)
def process_group():
    init_parallel()  # megatron-core's blended index builder asks for the rank


def random_dataset(prefix: str, docs: int = 200, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(50, 400, size=docs)
    with IndexedWriter(prefix + ".bin", np.uint16) as writer:
        writer.add_documents(rng.integers(2, 512, size=int(lengths.sum())), lengths)
        writer.finalize(prefix + ".idx")
    return prefix


def data_cfg(blend, cache, split="'90,10,0'"):
    return load_config(
        [
            f"data.blend=[{','.join(map(str, blend))}]",
            f"data.cache_dir={cache}",
            f"data.split={split}",
            "data.tokenizer=unused",
        ]
    ).data


def test_blend_proportions_within_one_percent(tiny_data, tmp_path):
    other = random_dataset(str(tmp_path / "random"))
    cfg = data_cfg([0.3, tiny_data["prefix"], 0.7, other], tmp_path / "cache")
    splits = build_splits(cfg, 64, Tokenizer(tiny_data["tokenizer"]), (10_000, 100, 0))
    first = np.asarray(splits.train.dataset_index[:10_000])
    assert abs((first == 0).mean() - 0.3) < 0.01
    assert abs((first == 1).mean() - 0.7) < 0.01
    sample = splits.train[0]
    assert sample["tokens"].shape == (64,) and sample["labels"].shape == (64,)
    assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()


def test_indices_are_cached_and_identical_when_rebuilt(tiny_data, tmp_path):
    tok = Tokenizer(tiny_data["tokenizer"])
    for cache in ("a", "b"):
        splits = build_splits(data_cfg([tiny_data["prefix"]], tmp_path / cache), 64, tok, (500, 50, None))
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and any(str(f).endswith(".npy") for f in files_a)
    for f in files_a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    again = build_splits(data_cfg([tiny_data["prefix"]], tmp_path / "a"), 64, tok, (500, 50, None))
    assert again.train[7]["tokens"].tolist() == splits.train[7]["tokens"].tolist()


def test_samples_cross_document_boundaries(tiny_data, tmp_path):
    tok = Tokenizer(tiny_data["tokenizer"])
    splits = build_splits(data_cfg([tiny_data["prefix"]], tmp_path / "c"), 512, tok, (200, 10, None))
    assert any(tok.eod in splits.train[i]["tokens"].tolist() for i in range(50))


def test_empty_split_is_a_clear_error(tiny_data, tmp_path):
    tok = Tokenizer(tiny_data["tokenizer"])
    with pytest.raises(
        ValueError, match="leaves the valid split of .* without documents \\(60 documents in all\\)"
    ):
        build_splits(data_cfg([tiny_data["prefix"]], tmp_path / "d", "'999,1,0'"), 64, tok, (100, 10, None))
