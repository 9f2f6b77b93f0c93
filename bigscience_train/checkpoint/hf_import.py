"""`bigscience ckpt import-hf DIR OUT`: a Hugging Face BLOOM-style directory to a run directory holding a DCP
checkpoint (weights only) that loads at any layout, for evaluation or `train.load=OUT train.finetune=true`.

The model config comes from config.json. Tensors stream from the safetensors files into DCP one at a time
(import_run.write_run): each is read from its file only when the writer asks for it, so memory holds one
tensor, never the model. The output appears under its final name when complete. Names: BloomForCausalLM's (transformer.h.0...), or BloomModel's without the `transformer.` prefix
as the released bigscience/bloom* files have them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from bigscience_train.checkpoint.dcp import TrainState
from bigscience_train.checkpoint.hf_export import TIED_OUTPUT
from bigscience_train.checkpoint.import_run import Loader, write_run
from bigscience_train.config import load_config

TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


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


def source_files(hf_dir: Path) -> dict[str, list[int]]:
    """[size, modification time in ns] of each file an import reads: an import of other files is another."""
    stats = {f.name: f.stat() for f in [hf_dir / "config.json", *sorted(hf_dir.glob("*.safetensors"))]}
    return {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}


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
    # transformers >= 4.56 writes `dtype`, earlier releases `torch_dtype`.
    dtype = TORCH_DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "float32", "fp32")
    overrides.append(f"precision={dtype}")
    tokenizer = hf_dir / "tokenizer.json"
    if tokenizer.is_file():
        overrides.append(f"data.tokenizer={out / 'tokenizer.json'}")
    cfg = load_config(overrides)

    names = {_our_name(n): n for n in sources}
    if cfg.model.tie_embeddings and TIED_OUTPUT not in names:
        names[TIED_OUTPUT] = names["transformer.word_embeddings.weight"]

    def loader(stored: str) -> Loader:
        def load() -> torch.Tensor:
            with safe_open(str(sources[stored]), framework="pt") as f:
                return f.get_tensor(stored)

        return load

    tensors = {}
    for ours, stored in names.items():
        with safe_open(str(sources[stored]), framework="pt") as f:
            info = f.get_slice(stored)
            shape, dtype_name = info.get_shape(), info.get_dtype()
        torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype_name]
        tensors[f"model.{ours}"] = (torch.empty(shape, dtype=torch_dtype, device="meta"), loader(stored))
    meta = {
        "parameters": sum(t.numel() for n, (t, _) in tensors.items() if n != f"model.{TIED_OUTPUT}"),
        "dtype": dtype,
        "imported_from": str(hf_dir.resolve()),
        "source_files": source_files(hf_dir),
        "weights_only": True,
    }
    copies = {"tokenizer.json": tokenizer} if tokenizer.is_file() else {}
    return write_run(out, cfg, tensors, {}, TrainState(), meta, copies)
