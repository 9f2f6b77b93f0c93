"""`bigscience ckpt import-megds GLOBAL_STEP_DIR OUT`: a Megatron-DeepSpeed checkpoint, at any (tp, pp) and
data-parallel size, regular (layer files, mp_rank files, ZeRO-1 or bf16-optimizer partitions) or universal
(DeepSpeed's ds_to_universal), to a run directory holding one checkpoint of ours that training resumes from
at any of our layouts: the fp32 masters as the weights, AdamW's moments and step counts, the step, consumed
samples and tokens (the LR schedule's position) and the fp16 loss scale. The model and optimizer config come
from Megatron's args stored in the checkpoint. Without optimizer partitions (or with weights_only) the layer
files' weights alone are imported, in their stored dtype, for `train.finetune=true` or evaluation.

The embedding keeps the source's rows (Megatron pads the vocabulary to a multiple of
make_vocab_size_divisible_by x tp) unless `vocab_size` says otherwise: extra padding rows are dropped, missing
ones (a universal checkpoint stores the original vocabulary only) are zeros, in the weights and the moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bigscience_train.checkpoint import megds_format as fmt
from bigscience_train.checkpoint.dcp import TrainState
from bigscience_train.checkpoint.hf_export import TIED_OUTPUT
from bigscience_train.checkpoint.import_run import Loader, write_run
from bigscience_train.checkpoint.megds_read import MegdsCheckpoint, RegularCheckpoint, open_checkpoint
from bigscience_train.config import load_config
from bigscience_train.model.gpt import GPT
from bigscience_train.model.shape import shape_fields

MOMENTS = ("exp_avg", "exp_avg_sq")
POSITIONS = {"alibi": "alibi", "absolute": "learned"}
DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass
class ImportSummary:
    out: Path
    kind: str
    layout: dict
    state: TrainState
    weights_only: bool
    rows: tuple[int, int]
    averaged: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        layout = " ".join(f"{k}={v}" for k, v in self.layout.items() if v is not None)
        source_rows, rows = self.rows
        lines = [
            f"imported a {self.kind} Megatron-DeepSpeed checkpoint ({layout}) to {self.out}",
            f"step {self.state.step}, {self.state.consumed_samples:,} samples, "
            f"{self.state.consumed_tokens:,} tokens"
            + (" (weights only)" if self.weights_only else ", weights from the fp32 masters, AdamW moments"),
            f"embedding rows: {source_rows} stored, {rows} written",
        ]
        for name, difference in sorted(self.averaged.items()):
            lines.append(
                f"averaged over tensor-parallel ranks: {name} (they differed by up to {difference:.3g})"
            )
        return "\n".join(lines + self.notes)


def _get(args, name: str, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


def _warmup_samples(args, decay: int | None) -> int:
    if _get(args, "lr_warmup_samples", 0):
        return int(args.lr_warmup_samples)
    if _get(args, "lr_warmup_iters", 0):
        return int(args.lr_warmup_iters) * int(args.global_batch_size)
    if _get(args, "lr_warmup_fraction") and decay:
        return int(args.lr_warmup_fraction * decay)
    return 0


def _decay_samples(args) -> int | None:
    if _get(args, "lr_decay_samples"):
        return int(args.lr_decay_samples)
    if _get(args, "lr_decay_iters"):
        return int(args.lr_decay_iters) * int(args.global_batch_size)
    return _get(args, "train_samples")


def _precision(args, ds_config: dict) -> list[str]:
    if _get(args, "bf16", False):
        return ["precision=bf16"]
    if not _get(args, "fp16", False):
        return ["precision=fp32"]
    fp16 = ds_config.get("fp16", {})
    initial = fp16.get("initial_scale_power")
    if initial is None:
        initial = round(math.log2(_get(args, "initial_loss_scale", 2**32)))
    return [
        "precision=fp16",
        f"precision.initial_scale_power={initial}",
        f"precision.loss_scale_window={fp16.get('loss_scale_window', _get(args, 'loss_scale_window', 1000))}",
        f"precision.hysteresis={fp16.get('hysteresis', _get(args, 'hysteresis', 2))}",
        f"precision.min_loss_scale={fp16.get('min_loss_scale', _get(args, 'min_loss_scale', 1.0))}",
    ]


def _architecture_problems(args, checkpoint_version) -> list[str]:
    problems = []
    if checkpoint_version is not None and checkpoint_version < 2.0:
        problems.append(
            f"checkpoint_version {checkpoint_version}: query_key_value is laid out per head as "
            "[heads, 3, head_dim] only from version 2.0 on"
        )
    if _get(args, "apply_residual_connection_post_layernorm", False):
        problems.append("apply_residual_connection_post_layernorm=True has no equivalent here")
    if _get(args, "glu_activation") is not None:
        problems.append(f"glu_activation={args.glu_activation} has no equivalent here (a GeLU MLP)")
    if _get(args, "untie_embeddings_and_output_weights", False):
        problems.append("untied embeddings: the output layer here is the word embedding")
    hidden, heads = args.hidden_size, args.num_attention_heads
    if _get(args, "ffn_hidden_size", 4 * hidden) != 4 * hidden:
        problems.append(f"ffn_hidden_size={args.ffn_hidden_size} (here 4 x hidden_size = {4 * hidden})")
    if _get(args, "kv_channels", hidden // heads) != hidden // heads:
        problems.append(f"kv_channels={args.kv_channels} (here hidden_size / heads = {hidden // heads})")
    position = getattr(_get(args, "position_embedding_type"), "name", "absolute")
    if position not in POSITIONS:
        problems.append(f"position_embedding_type={position} is not mapped (alibi and absolute are)")
    style = _get(args, "lr_decay_style", "linear")
    if style not in DECAY_STYLES:
        problems.append(f"lr_decay_style={style} (here {', '.join(DECAY_STYLES)})")
    return problems


def config_overrides(args, first: dict, rows: int, out: Path) -> list[str]:
    """Our Hydra overrides for the model and training the checkpoint's Megatron args describe; a ValueError
    listing every argument that has no equivalent here."""
    problems = _architecture_problems(args, first.get("checkpoint_version"))
    if problems:
        raise ValueError("this checkpoint has no equivalent here: " + "; ".join(problems))
    ds_config = first.get("ds_config") or {}
    decay = _decay_samples(args)
    rampup = [int(v) for v in _get(args, "rampup_batch_size", [])]
    hidden = args.hidden_size
    return [
        f"name={out.name}",
        f"run_dir={out}",
        f"model.name={out.name}",
        f"model.num_layers={args.num_layers}",
        f"model.hidden_size={hidden}",
        f"model.num_heads={args.num_attention_heads}",
        f"model.seq_length={args.seq_length}",
        f"model.vocab_size={rows}",
        # Every row is stored: the padding rule must not add any, at tp=1 nor at the tp sizes that divide it.
        f"model.make_vocab_size_divisible_by={128 if rows % 128 == 0 else 1}",
        f"model.position={POSITIONS[getattr(_get(args, 'position_embedding_type'), 'name', 'absolute')]}",
        f"model.embedding_layernorm={str(bool(_get(args, 'embed_layernorm', False))).lower()}",
        "model.tie_embeddings=true",
        f"model.layernorm_epsilon={_get(args, 'layernorm_epsilon', 1e-5)}",
        f"model.init_std={_get(args, 'init_method_std', 0.02)}",
        f"model.hidden_dropout={_get(args, 'hidden_dropout', 0.1)}",
        f"model.attention_dropout={_get(args, 'attention_dropout', 0.1)}",
        *_precision(args, ds_config),
        f"optim.lr={args.lr}",
        f"optim.min_lr={_get(args, 'min_lr', 0.0)}",
        f"optim.weight_decay={_get(args, 'weight_decay', 0.01)}",
        f"optim.beta1={_get(args, 'adam_beta1', 0.9)}",
        f"optim.beta2={_get(args, 'adam_beta2', 0.999)}",
        f"optim.eps={_get(args, 'adam_eps', 1e-8)}",
        f"optim.clip_grad={ds_config.get('gradient_clipping', _get(args, 'clip_grad', 1.0))}",
        f"optim.decay_style={_get(args, 'lr_decay_style', 'linear')}",
        f"optim.warmup_samples={_warmup_samples(args, decay)}",
        f"optim.decay_samples={'null' if decay is None else decay}",
        f"optim.decay_tokens={_get(args, 'lr_decay_tokens', 'null')}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.global_batch_size={args.global_batch_size}",
        f"train.rampup_batch_size=[{','.join(map(str, rampup))}]",
        f"train.seed={_get(args, 'seed', 1234)}",
    ]


def train_state(ckpt: MegdsCheckpoint, loss_scaler) -> tuple[TrainState, list[str]]:
    """The step, consumed samples and tokens, skipped steps and loss scale Megatron and DeepSpeed stored."""
    first, args, notes = ckpt.first, ckpt.args, []
    step = int(first.get("iteration", first.get("global_steps", 0)))
    samples = _get(args, "consumed_train_samples", first.get("global_samples", 0))
    scheduler = first.get("lr_scheduler") or {}
    if "num_steps" in scheduler and scheduler["num_steps"] != samples:
        notes.append(
            f"note: Megatron's LR scheduler is at {scheduler['num_steps']:,} (samples), the args at {samples:,}: "
            "the schedule continues from the args' consumed samples"
        )
    tokens = first.get("tokens", _get(args, "consumed_train_tokens", samples * args.seq_length))
    state = TrainState(
        step=step,
        consumed_samples=int(samples),
        consumed_tokens=int(tokens),
        skipped_steps=int(first.get("skipped_steps", 0)),
    )
    if _get(args, "fp16", False) and loss_scaler is not None:
        state.loss_scaler = loss_scale_state(loss_scaler)
    return state, notes


def loss_scale_state(scaler) -> dict:
    """DeepSpeed's loss scaler as our DynamicLossScaler's state: the scale, the hysteresis left, and the clean
    steps counted toward the next doubling (DeepSpeed doubles when the steps since the last overflow, less one,
    are a positive multiple of the window; ours after `window` clean steps)."""
    scale = float(scaler.cur_scale)
    if not getattr(scaler, "dynamic", getattr(scaler, "scale_window", None) is not None):
        return {"scale": scale, "growth_tracker": 0, "hysteresis_tracker": 1}
    window = int(scaler.scale_window)
    since = int(scaler.cur_iter) - int(scaler.last_overflow_iter) - 1
    next_growth = max(math.ceil(since / window), 1) * window
    growth = max(window - (next_growth - since + 1), 0)
    return {"scale": scale, "growth_tracker": growth, "hysteresis_tracker": int(scaler.cur_hysteresis)}


def _fit_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding])


def _adam_settings(cfg, lr: float) -> dict[bool, dict]:
    """The param-group settings our AdamW stores, without and with weight decay: those of a tp=1 run (fused),
    from torch itself."""
    o = cfg.optim
    settings = {}
    for decay in (False, True):
        probe = torch.nn.Parameter(torch.empty(1, device="meta"))
        adam = torch.optim.AdamW(
            [probe],
            lr=lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay if decay else 0.0,
            fused=True,
            foreach=False,
        )
        settings[decay] = {k: v for k, v in adam.param_groups[0].items() if k != "params"}
    return settings


def _source_rows(ckpt: MegdsCheckpoint, name: str, from_layers: bool) -> int:
    """The embedding's rows as trained (a universal checkpoint's are cut to the original vocabulary)."""
    info = ckpt.first.get("universal_checkpoint_info") or {}
    if ckpt.kind == "universal" and info.get("padded_vocab_size"):
        return int(info["padded_vocab_size"])
    return (ckpt.weight(name) if from_layers else ckpt.tensor(name, "fp32")).shape[0]


def _original_vocab(ckpt: MegdsCheckpoint) -> int | None:
    for key in ("checkpoint_info", "universal_checkpoint_info"):
        info = ckpt.first.get(key) or {}
        if info.get("original_vocab_size"):
            return int(info["original_vocab_size"])
    return None


def _our_names(names: list[str], num_layers: int) -> dict[str, str]:
    """Our name -> the checkpoint's, for every parameter."""
    ours = {}
    for name in names:
        layer, key = fmt.split_param_name(name)
        ours[fmt.our_name(layer, key, num_layers)] = name
    return ours


def _check_complete(path: Path, expected: dict, ours: dict) -> None:
    missing = sorted(set(expected) - set(ours) - {TIED_OUTPUT})
    extra = sorted(set(ours) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{path}: the checkpoint's parameters do not make the model its args describe: "
            f"missing {missing or 'none'}, unknown {extra or 'none'}"
        )


def _optimizer_entries(ckpt, cfg, ours: dict, expected: dict, placeholder, source) -> tuple[dict, dict]:
    """AdamW's moments and step counts (tensors, loaded when written) and its param-group settings, by DCP
    key, as our checkpoints store a flattened optimizer state (checkpoint/dcp.py)."""
    groups = ckpt.optimizer_common()["param_groups"]
    settings = _adam_settings(cfg, groups[0]["lr"] if groups else cfg.optim.lr)
    tensors, values = {}, {}
    for our, name in ours.items():
        for moment in MOMENTS:
            tensors[f"optim.state.{our}.{moment}"] = (placeholder(our, torch.float32), source(name, moment))
        step = float(ckpt.adam_step(name))
        tensors[f"optim.state.{our}.step"] = (
            torch.empty((), dtype=torch.float32, device="meta"),
            lambda step=step: torch.tensor(step, dtype=torch.float32),
        )
        for key, value in settings[expected[our].ndim >= 2].items():
            values[f"optim.param_groups.{our}.{key}"] = value
    return tensors, values


def import_megds(
    path: str | Path, out: str | Path, vocab_size: int | None = None, weights_only: bool = False
) -> ImportSummary:
    path, out = Path(path), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output directory")
    ckpt = open_checkpoint(path)
    if ckpt.args is None:
        raise ValueError(f"{ckpt.mp_files[0]} holds no Megatron args: the model's shape is unknown")
    weights_only = weights_only or not ckpt.has_optimizer
    # The layer files' weights, in the training dtype, where only they are imported; else the fp32 masters.
    from_layers = weights_only and isinstance(ckpt, RegularCheckpoint)
    ours = _our_names(ckpt.layer_names() if from_layers else ckpt.names(), ckpt.args.num_layers)
    vocab_name = ours["transformer.word_embeddings.weight"]
    source_rows = _source_rows(ckpt, vocab_name, from_layers)
    rows = vocab_size or source_rows
    original = _original_vocab(ckpt)
    if original is not None and rows < original:
        raise ValueError(f"vocab_size={rows} would drop tokens: the tokenizer's vocabulary has {original}")
    cfg = load_config(config_overrides(ckpt.args, ckpt.first, rows, out))
    expected = dict(GPT(shape_fields(cfg.model), device="meta").state_dict(keep_vars=True))
    _check_complete(path, expected, ours)

    def source(name: str, state: str) -> Loader:
        def load() -> torch.Tensor:
            tensor = ckpt.weight(name) if state == "weight" else ckpt.tensor(name, state)
            return _fit_rows(tensor, rows) if name == vocab_name else tensor

        return load

    def placeholder(our: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(expected[our].shape, dtype=dtype, device="meta")

    tensors: dict[str, tuple[torch.Tensor, Loader]] = {}
    for our, name in ours.items():
        dtype = ckpt.weight(name).dtype if from_layers else torch.float32
        tensors[f"model.{our}"] = (placeholder(our, dtype), source(name, "weight" if from_layers else "fp32"))
    tensors[f"model.{TIED_OUTPUT}"] = tensors["model.transformer.word_embeddings.weight"]
    values: dict[str, object] = {}
    state, notes = TrainState(), []
    if not weights_only:
        optim_tensors, values = _optimizer_entries(ckpt, cfg, ours, expected, placeholder, source)
        tensors.update(optim_tensors)
        state, notes = train_state(ckpt, ckpt.optimizer_common()["loss_scaler"])
    meta = {
        "parameters": sum(p.numel() for n, p in expected.items() if n != TIED_OUTPUT),
        "dtype": cfg.precision.dtype.value,
        "imported_from": str(path.resolve()),
        "weights_only": weights_only,
        "megds": {
            "kind": ckpt.kind,
            "tp": ckpt.tp,
            "pp": ckpt.pp,
            "dp": ckpt.dp,
            "iteration": int(ckpt.first.get("iteration", 0)),
            "lr_scheduler": ckpt.first.get("lr_scheduler"),
            "embedding_rows": [source_rows, rows],
        },
    }
    write_run(out, cfg, tensors, values, state, meta)
    if isinstance(ckpt, RegularCheckpoint) and not weights_only:
        notes += _masters_against_weights(ckpt, list(ours.values()))
    layout = {"tp": ckpt.tp, "pp": ckpt.pp, "dp": ckpt.dp}
    return ImportSummary(
        out, ckpt.kind, layout, state, weights_only, (source_rows, rows), dict(ckpt.averaged), notes
    )


def _masters_against_weights(ckpt: RegularCheckpoint, names: list[str]) -> list[str]:
    """The layer files' weights are the masters in the training dtype: a parameter where they are not is
    named (a checkpoint saved between an optimizer step and the copy back, or damaged)."""
    differ = [
        name
        for name in names
        if not torch.equal(ckpt.weight(name), ckpt.tensor(name, "fp32").to(ckpt.weight(name).dtype))
    ]
    if not differ:
        return []
    return [
        f"warning: the layer files' weights are not the fp32 masters in {len(differ)} tensors: {differ[:5]}"
    ]
