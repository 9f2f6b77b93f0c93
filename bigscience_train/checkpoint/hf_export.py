"""`bigscience ckpt export-hf`: a checkpoint to a Hugging Face BloomForCausalLM directory.

Our parameter names are BloomForCausalLM's, so export is a copy: tensors are read from the DCP checkpoint
one at a time (whatever layout saved them) and written to safetensors shards of at most `max_shard_bytes`,
so memory holds one shard, never the model. The directory appears under its final name only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import save_file

from bigscience_train.checkpoint.integrity import CheckpointIntegrityError, problems
from bigscience_train.checkpoint.reader import iter_model_tensors, model_tensors_metadata, resolve_checkpoint
from bigscience_train.data.tokenizer import Tokenizer
from bigscience_train.fsutil import temporary_sibling

TIED_OUTPUT = "lm_head.weight"


def bloom_config(model_cfg, vocab_size: int, tokenizer: Tokenizer | None, dtype: str) -> dict:
    problems = []
    if model_cfg.position != "alibi":
        problems.append(f"model.position={model_cfg.position} (BLOOM uses alibi)")
    if not model_cfg.embedding_layernorm:
        problems.append("model.embedding_layernorm=false (BLOOM has a layernorm after the word embedding)")
    if problems:
        raise ValueError("this checkpoint has no Hugging Face BLOOM equivalent: " + "; ".join(problems))
    eos = tokenizer.eod if tokenizer else None
    return {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "vocab_size": vocab_size,
        "hidden_size": model_cfg.hidden_size,
        "n_layer": model_cfg.num_layers,
        "n_head": model_cfg.num_heads,
        "layer_norm_epsilon": model_cfg.layernorm_epsilon,
        "initializer_range": model_cfg.init_std,
        "hidden_dropout": model_cfg.hidden_dropout,
        "attention_dropout": model_cfg.attention_dropout,
        "apply_residual_connection_post_layernorm": False,
        "tie_word_embeddings": bool(model_cfg.tie_embeddings),
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad if tokenizer and tokenizer.pad >= 0 else eos,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
        "use_cache": True,
    }


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards, current, current_bytes = [], [], 0
    for name, size in sizes.items():
        if current and current_bytes + size > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    return [*shards, current] if current else shards


def _write_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    tokenizer.save_json(out / "tokenizer.json")
    eos = tokenizer.hf.id_to_token(tokenizer.eod)
    pad = tokenizer.hf.id_to_token(tokenizer.pad) if tokenizer.pad >= 0 else eos
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": pad}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def export_hf(path: str | Path, out: str | Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
    step_dir, out = resolve_checkpoint(path), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output directory")
    damaged = problems(step_dir)
    if damaged:
        raise CheckpointIntegrityError(step_dir, damaged)
    cfg = OmegaConf.create((step_dir / "config.yaml").read_text())
    tensors = model_tensors_metadata(step_dir)
    try:
        tokenizer = Tokenizer.from_config(cfg.data)
    except FileNotFoundError:
        # A checkpoint moved away from its tokenizer still exports its weights.
        tokenizer = None
    vocab = tensors["transformer.word_embeddings.weight"].size[0]
    config = bloom_config(cfg.model, vocab, tokenizer, cfg.precision.dtype)
    # HF ties lm_head to the word embedding on load; safetensors cannot store the same tensor twice.
    names = [n for n in tensors if not (config["tie_word_embeddings"] and n == TIED_OUTPUT)]
    sizes = {n: tensors[n].size.numel() * tensors[n].properties.dtype.itemsize for n in names}
    groups = _shards(sizes, max_shard_bytes)

    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map = {}
        for i, group in enumerate(groups, start=1):
            filename = (
                "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            )
            save_file(
                dict(iter_model_tensors(step_dir, group)), str(tmp / filename), metadata={"format": "pt"}
            )
            weight_map.update(dict.fromkeys(group, filename))
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
