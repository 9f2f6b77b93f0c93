"""`bigscience ckpt import-hf DIR OUT`: a Hugging Face BLOOM-style directory to a run directory holding a DCP
checkpoint (weights only) that loads at any layout, for evaluation or `train.load=OUT train.finetune=true`.

The model config comes from config.json. Tensors stream from the safetensors files into DCP one at a time: the
save is planned from shapes alone (meta tensors), and each tensor is read from its file only when the writer
asks for it, so memory holds one tensor, never the model. The output appears under its final name when
complete. Names: BloomForCausalLM's (transformer.h.0...), or BloomModel's without the `transformer.` prefix
as the released bigscience/bloom* files have them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from bigscience_train import __version__
from bigscience_train.checkpoint.dcp import TrainState
from bigscience_train.checkpoint.hf_export import TIED_OUTPUT
from bigscience_train.checkpoint.integrity import checksums, file_record
from bigscience_train.checkpoint.paths import LATEST, step_dir_name
from bigscience_train.config import load_config, to_yaml
from bigscience_train.fsutil import atomic_write_text, temporary_sibling

TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans from meta tensors; reads each tensor from its source when the writer reaches it."""

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]):
        super().__init__()
        self.loaders = loaders

    def resolve_data(self, write_item):
        return self.loaders[write_item.index.fqn]().contiguous()


def read_bloom_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    config = json.loads(path.read_text())
    if config.get("model_type") != "bloom":
        raise ValueError(
            f"{path}: model_type={config.get('model_type')!r}; import-hf reads BLOOM-style models"
        )
    if config.get("apply_residual_connection_post_layernorm"):
        raise ValueError(f"{path}: apply_residual_connection_post_layernorm=true has no equivalent here")
    return config


def _sources(hf_dir: Path) -> dict[str, Path]:
    """Tensor name (as stored) -> safetensors file."""
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{hf_dir} has no *.safetensors files (pickled pytorch_model.bin files are not read: convert them "
            "with safetensors first)"
        )
    sources = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            sources.update(dict.fromkeys(f.keys(), file))
    return sources


def _our_name(name: str) -> str:
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


def model_overrides(config: dict, name: str, seq_length: int) -> list[str]:
    vocab = config["vocab_size"]
    divisible = 128 if vocab % 128 == 0 else 1  # keep the stored vocabulary unpadded at tp=1
    return [
        f"model.name={name}",
        f"model.num_layers={config.get('n_layer', config.get('num_hidden_layers'))}",
        f"model.hidden_size={config.get('hidden_size', config.get('n_embed'))}",
        f"model.num_heads={config.get('n_head', config.get('num_attention_heads'))}",
        f"model.seq_length={seq_length}",
        f"model.vocab_size={vocab}",
        f"model.make_vocab_size_divisible_by={divisible}",
        "model.position=alibi",
        "model.embedding_layernorm=true",
        f"model.tie_embeddings={str(config.get('tie_word_embeddings', True)).lower()}",
        f"model.layernorm_epsilon={config.get('layer_norm_epsilon', 1e-5)}",
        f"model.init_std={config.get('initializer_range', 0.02)}",
    ]


def import_hf(hf_dir: str | Path, out: str | Path, seq_length: int = 2048) -> Path:
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output directory")
    config = read_bloom_config(hf_dir)
    sources = _sources(hf_dir)
    overrides = [*model_overrides(config, hf_dir.name, seq_length), f"run_dir={out}", f"name={hf_dir.name}"]
    dtype = TORCH_DTYPES.get(config.get("torch_dtype", "float32"), "fp32")
    overrides.append(f"precision={dtype}")
    tokenizer = hf_dir / "tokenizer.json"
    if tokenizer.is_file():
        overrides.append(f"data.tokenizer={out / 'tokenizer.json'}")
    cfg = load_config(overrides)

    names = {_our_name(n): n for n in sources}
    if cfg.model.tie_embeddings and TIED_OUTPUT not in names:
        names[TIED_OUTPUT] = names["transformer.word_embeddings.weight"]

    def loader(stored: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            with safe_open(str(sources[stored]), framework="pt") as f:
                return f.get_tensor(stored)

        return load

    placeholders, loaders = {}, {}
    for ours, stored in names.items():
        with safe_open(str(sources[stored]), framework="pt") as f:
            meta = f.get_slice(stored)
            shape, dtype_name = meta.get_shape(), meta.get_dtype()
        torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype_name]
        placeholders[ours] = torch.empty(shape, dtype=torch_dtype, device="meta")
        loaders[f"model.{ours}"] = loader(stored)

    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    step = tmp / "checkpoints" / step_dir_name(0)
    step.mkdir(parents=True)
    try:
        start = time.perf_counter()
        dcp.save(
            {"model": placeholders},
            storage_writer=FileSystemWriter(str(step), thread_count=1),
            planner=_StreamingSavePlanner(loaders),
            no_dist=True,
        )
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        (step / "config.yaml").write_text(to_yaml(cfg))
        (step / "train_state.json").write_text(json.dumps(asdict(TrainState()), indent=2))
        names = [p.name for p in step.iterdir() if p.is_file()]
        meta = {
            "version": __version__,
            "model": cfg.model.name,
            "parameters": sum(p.numel() for n, p in placeholders.items() if n != TIED_OUTPUT),
            "layout": {"tp": 1, "pp": 1, "dp": 1},
            "dtype": dtype,
            "imported_from": str(hf_dir.resolve()),
            "weights_only": True,
            **asdict(TrainState()),
            **file_record(step, names, checksums(step, names)),
            "save_seconds": time.perf_counter() - start,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (step / "meta.json").write_text(json.dumps(meta, indent=2))
        atomic_write_text(tmp / "config.yaml", to_yaml(cfg))
        atomic_write_text(tmp / "checkpoints" / LATEST, step.name + "\n")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
