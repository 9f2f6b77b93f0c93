"""`bigscience ckpt export-megds RUN OUT`: one checkpoint of ours to a DeepSpeed universal checkpoint,
OUT/global_stepN/, that Megatron-DeepSpeed resumes with `--universal-checkpoint` (DeepSpeed's
`"checkpoint": {"load_universal": true}`) at the (tp, pp) it is written for and any data-parallel size.

The files are those DeepSpeed's ds_to_universal writes and its loader (universal_checkpoint.py,
load_hp_checkpoint_state) reads: zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt, each {'param': the whole tensor,
'cat_dim': its tensor-parallel dimension (none where every rank holds it whole), 'vocab_tensor': True on the
word embedding}, zero/<param>/step.pt (AdamW's step count), zero/optimizer_state.pt (the param groups' lr,
betas, eps and weight decay, Megatron's order: decayed first, gradient clipping, DeepSpeed's fp16 loss scaler),
and one mp_rank_XX_model_states.pt per model-parallel rank of the target layout: DeepSpeed's counters and
Megatron's LR scheduler state (samples), with Megatron's client state (args, iteration, tokens,
checkpoint_version 3.0, checkpoint_info, universal_checkpoint_info). OUT/latest_universal and OUT/latest
name the tag. Parameters carry Megatron-DeepSpeed's GPTModelPipe names (megds_format.py).

The embedding is written with the rows Megatron's model has at the target layout (the tokenizer's vocabulary
padded to a multiple of make_vocab_size_divisible_by x tp): our rows, cut or padded with zeros. DeepSpeed
pads it further with zeros for a larger layout; for a smaller one, export again.

No RNG state is written: Megatron's dropout streams (the CUDA RNG tracker) are not ours to continue, so
Megatron-DeepSpeed resumes with `--no-load-rng` too.

Megatron's and DeepSpeed's classes in these files (its enums in args, DeepSpeed's DynamicLossScaler) are
written from our stand-ins (safe_load.py) under their names, so writing imports neither project.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from bigscience_train.checkpoint import megds_format as fmt
from bigscience_train.checkpoint.dcp import TrainState
from bigscience_train.checkpoint.hf_export import TIED_OUTPUT
from bigscience_train.checkpoint.integrity import CheckpointIntegrityError, problems
from bigscience_train.checkpoint.megds_import import MOMENTS, _fit_rows
from bigscience_train.checkpoint.megds_import import POSITIONS as IMPORTED_POSITIONS
from bigscience_train.checkpoint.reader import iter_tensors, read_meta, resolve_checkpoint, tensors_metadata
from bigscience_train.checkpoint.safe_load import MEGATRON_ENUMS, LossScalerState
from bigscience_train.config.load import load_config_file
from bigscience_train.config.validate import padded_vocab_size
from bigscience_train.fsutil import atomic_write_text, temporary_sibling
from bigscience_train.schedules import BatchSizeSchedule, LRSchedule, total_train_samples

# The DeepSpeed release whose universal checkpoint loader these files follow (tests/test_megds_export.py
# loads them with it); its ZeRO optimizer refuses files without a ds_version.
DS_VERSION = "0.19.8"
# That release's universal_checkpoint_info version (ds_to_universal reads it, the loader does not).
UNIVERSAL_CHECKPOINT_VERSION = 0.4
CHECKPOINT_VERSION = 3.0
LATEST_FILES = ("latest_universal", "latest")
# Our model.position -> Megatron's PositionEmbeddingType.
POSITIONS = {ours: theirs for theirs, ours in IMPORTED_POSITIONS.items()}
# Our stand-ins, and the class each is written as.
_FOREIGN_CLASSES = {
    LossScalerState: "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    **{cls: f"megatron.enums.{name}" for name, cls in MEGATRON_ENUMS.items()},
}


class _ForeignNamePickler(pickle._Pickler):
    """Python's pickler, writing our stand-ins of Megatron's and DeepSpeed's classes as references to theirs
    (by name, as GLOBAL opcodes): the reader unpickles their classes, and neither project is imported here."""

    def save_global(self, obj, name=None):
        foreign = _FOREIGN_CLASSES.get(obj)
        if foreign is None:
            return super().save_global(obj, name)
        module, _, qualname = foreign.rpartition(".")
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)
        return None


# torch.save takes the module its Pickler comes from.
_FOREIGN_PICKLE = types.ModuleType(f"{__name__}.pickle")
_FOREIGN_PICKLE.Pickler = _ForeignNamePickler


def save_foreign(obj, path: Path) -> None:
    """torch.save, with our stand-ins written under Megatron's and DeepSpeed's class names."""
    torch.save(obj, path, pickle_module=_FOREIGN_PICKLE)


@dataclass
class ExportSummary:
    out: Path
    step: int
    layout: dict
    rows: tuple[int, int]
    state: TrainState

    def describe(self) -> str:
        tp, pp = self.layout["tp"], self.layout["pp"]
        ours, written = self.rows
        return "\n".join(
            [
                f"wrote a DeepSpeed universal checkpoint of step {self.step} for tp={tp} pp={pp} to {self.out}",
                f"{self.state.consumed_samples:,} samples, {self.state.consumed_tokens:,} tokens; fp32 masters, "
                f"AdamW moments; embedding rows: {ours} ours, {written} written",
                f"resume with Megatron-DeepSpeed: --load {self.out.parent} --universal-checkpoint --no-load-rng "
                f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}",
            ]
        )


def megds_names(num_layers: int) -> dict[str, str]:
    """Our name -> Megatron-DeepSpeed's (GPTModelPipe's), for every parameter a BLOOM-style GPT may have."""
    pairs = [(fmt.EMBEDDING_LAYER, key) for key in fmt.EMBEDDING_KEYS]
    pairs += [(fmt.FIRST_BLOCK_LAYER + i, key) for i in range(num_layers) for key in fmt.BLOCK_KEYS]
    pairs += [(fmt.final_norm_layer(num_layers), key) for key in fmt.FINAL_NORM_KEYS]
    return {fmt.our_name(layer, key, num_layers): fmt.param_name(layer, key) for layer, key in pairs}


def _layout_problems(cfg, tp: int, pp: int) -> list[str]:
    m = cfg.model
    found = []
    if m.position.value not in POSITIONS:
        found.append(
            f"model.position={m.position.value} (Megatron-DeepSpeed's alibi and absolute are mapped)"
        )
    if not m.tie_embeddings:
        found.append("model.tie_embeddings=false (GPTModelPipe's output layer is the word embedding)")
    if tp < 1 or m.num_heads % tp or (4 * m.hidden_size) % tp:
        found.append(
            f"--tp {tp} does not divide model.num_heads={m.num_heads} and the MLP's {4 * m.hidden_size}"
        )
    if not 1 <= pp <= m.num_layers:
        found.append(f"--pp {pp}: a pipeline of 1 to model.num_layers={m.num_layers} stages")
    return found


@dataclass
class _Schedule:
    """Where the LR schedule stands, as Megatron's AnnealingLR (counting samples) and as the next step's rate."""

    scheduler: dict
    next_lr: float
    train_samples: int
    decay_samples: int


def _schedule(cfg, state: TrainState) -> _Schedule:
    o, t, seq = cfg.optim, cfg.train, cfg.model.seq_length
    ramp = BatchSizeSchedule.from_config(t.global_batch_size, list(t.rampup_batch_size))
    train_samples = total_train_samples(t.iters, t.tokens, seq, ramp)
    decay_samples = o.decay_samples or train_samples
    samples = state.consumed_samples - state.lr_skipped_samples
    tokens = state.consumed_tokens - state.lr_skipped_tokens
    by_tokens = o.decay_tokens is not None
    warmup_tokens = o.warmup_samples * seq
    ours = LRSchedule(
        o.lr,
        o.min_lr,
        warmup_tokens if by_tokens else o.warmup_samples,
        o.decay_tokens if by_tokens else decay_samples,
        o.decay_style.value,
    )
    # A rollback's LR scale multiplies the whole schedule: its peak and its floor.
    scale = state.lr_scale
    scheduler = {
        "max_lr": o.lr * scale,
        "warmup_steps": o.warmup_samples,
        "num_steps": samples,
        # Megatron decays by tokens from where its warmup ended.
        "warmup_tokens": warmup_tokens if by_tokens and samples >= o.warmup_samples else 0,
        "num_tokens": tokens,
        "decay_style": o.decay_style.value,
        "decay_steps": decay_samples,
        "min_lr": o.min_lr * scale,
    }
    next_lr = ours.at(tokens if by_tokens else samples) * scale
    return _Schedule(scheduler, next_lr, train_samples, decay_samples)


def deepspeed_loss_scaler(state: dict, precision) -> LossScalerState:
    """Our DynamicLossScaler's state as DeepSpeed's DynamicLossScaler (fields as its __init__ sets them): the
    next doubling after the same number of clean steps (DeepSpeed doubles when the steps since its last
    overflow, less one, are a positive multiple of the window), the same hysteresis left (DeepSpeed halves
    at 1 where ours counts below it)."""
    scaler = LossScalerState()
    fields = {
        "cur_scale": float(state["scale"]),
        "dynamic": True,
        "cur_iter": int(state["growth_tracker"]) + 1,
        "last_overflow_iter": -1,
        "scale_factor": 2.0,
        "scale_window": int(precision.loss_scale_window),
        "min_scale": float(precision.min_loss_scale),
        "delayed_shift": int(precision.hysteresis),
        "cur_hysteresis": max(int(state["hysteresis_tracker"]), 1),
        "consecutive_hysteresis": False,
        "raise_error_at_min_scale": True,
        "dtype": torch.float16,
    }
    vars(scaler).update(fields)
    return scaler


def _optimizer_state(cfg, state: TrainState, lr: float, step: int) -> dict:
    """zero/optimizer_state.pt: DeepSpeed copies its param groups' settings into the target optimizer's (the
    step too: apex's FusedAdam, Megatron's, counts steps per group, where torch's AdamW reads step.pt)."""
    o = cfg.optim
    groups = [
        {"lr": lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": decay, "step": step}
        for decay in (o.weight_decay, 0.0)
    ]
    fp16 = cfg.precision.dtype.value == "fp16"
    common = {
        "dynamic_loss_scale": fp16,
        "overflow": False,
        "clip_grad": o.clip_grad,
        "ds_version": DS_VERSION,
        "param_groups": groups,
    }
    if fp16 and state.loss_scaler:
        common["loss_scaler"] = deepspeed_loss_scaler(state.loss_scaler, cfg.precision)
    return common


def _megatron_args(cfg, layout: dict, padded: int, divisible: int, state: TrainState, schedule: _Schedule):
    """Megatron-DeepSpeed's args (its names and types) for the run; --universal-checkpoint reads its consumed
    samples from them, and `bigscience ckpt import-megds` the model and training they describe."""
    m, o, t, p = cfg.model, cfg.optim, cfg.train, cfg.precision
    dtype = p.dtype.value
    positions = MEGATRON_ENUMS["PositionEmbeddingType"]
    return argparse.Namespace(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=4 * m.hidden_size,
        num_attention_heads=m.num_heads,
        kv_channels=m.hidden_size // m.num_heads,
        seq_length=m.seq_length,
        max_position_embeddings=m.seq_length,
        position_embedding_type=positions[POSITIONS[m.position.value]],
        embed_layernorm=m.embedding_layernorm,
        apply_residual_connection_post_layernorm=False,
        glu_activation=None,
        untie_embeddings_and_output_weights=False,
        layernorm_epsilon=m.layernorm_epsilon,
        init_method_std=m.init_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        make_vocab_size_divisible_by=divisible,
        padded_vocab_size=padded,
        tensor_model_parallel_size=layout["tp"],
        pipeline_model_parallel_size=layout["pp"],
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        rampup_batch_size=[str(v) for v in t.rampup_batch_size] or None,
        train_iters=t.iters,
        train_tokens=t.tokens,
        train_samples=schedule.train_samples,
        lr=o.lr * state.lr_scale,
        min_lr=o.min_lr * state.lr_scale,
        lr_decay_style=o.decay_style.value,
        lr_warmup_samples=o.warmup_samples,
        lr_decay_samples=schedule.decay_samples,
        lr_decay_tokens=o.decay_tokens,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        fp16=dtype == "fp16",
        bf16=dtype == "bf16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype],
        initial_loss_scale=2.0**p.initial_scale_power,
        loss_scale_window=p.loss_scale_window,
        hysteresis=p.hysteresis,
        min_loss_scale=p.min_loss_scale,
        seed=t.seed,
        consumed_train_samples=state.consumed_samples,
        consumed_valid_samples=0,
        consumed_train_tokens=state.consumed_tokens,
        attn_mask_type=MEGATRON_ENUMS["AttnMaskType"].causal,
        deepspeed=True,
    )


def _deepspeed_states(cfg, state: TrainState, schedule: _Schedule, layout: dict, dp: int) -> dict:
    """What DeepSpeed's engine keeps in an mp_rank file: its counters, the LR scheduler's state, no module or
    optimizer (a universal load takes both from zero/)."""
    return {
        "module": None,
        "buffer_names": [],
        "optimizer": None,
        "lr_scheduler": schedule.scheduler,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": state.skipped_steps,
        "global_steps": state.step,
        "global_samples": state.consumed_samples,
        "dp_world_size": dp,
        "mp_world_size": layout["tp"] * layout["pp"],
        "checkpoint_parallel_dimensions": {"pp_degree": layout["pp"], "tp_degree": layout["tp"]},
        "ds_config": _ds_config(cfg),
        "ds_version": DS_VERSION,
    }


def _ds_config(cfg) -> dict:
    """The DeepSpeed config the run's settings amount to (import-megds reads its fp16 and clipping)."""
    p, t = cfg.precision, cfg.train
    fp16 = {
        "enabled": p.dtype.value == "fp16",
        "initial_scale_power": p.initial_scale_power,
        "loss_scale_window": p.loss_scale_window,
        "hysteresis": p.hysteresis,
        "min_loss_scale": p.min_loss_scale,
    }
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "fp16": fp16,
        "bf16": {"enabled": p.dtype.value == "bf16"},
    }


def _universal_info(names: list[str], vocab: int, padded: int) -> dict:
    """GPTModelPipe's universal_checkpoint_info, each pattern one parameter's exact name."""

    def matching(rule) -> list[str]:
        return [re.escape(name) for name in names if rule(name)]

    split = {name: fmt.tp_split(fmt.split_param_name(name)[1]) for name in names}
    embedding = fmt.TIED_PREFIX + "word_embeddings.weight"
    return {
        "universal_checkpoint_version": UNIVERSAL_CHECKPOINT_VERSION,
        "original_vocab_size": vocab,
        "padded_vocab_size": padded,
        "vocabulary_parameter_patterns": [re.escape(embedding)],
        "pipeline_replicated_parameter_patterns": matching(lambda n: n.startswith(fmt.TIED_PREFIX)),
        "tp_replicated_parameter_patterns": matching(lambda n: split[n] is fmt.TPSplit.replicated),
        "parameter_with_row_parallelism_patterns": matching(lambda n: split[n] is fmt.TPSplit.row),
    }


def _write_parameter(folder: Path, name: str, tensors: dict[str, torch.Tensor], rows: int) -> None:
    """zero/<name>/: the master, the moments and the step, as ds_to_universal writes them."""
    folder.mkdir(parents=True)
    split = fmt.tp_split(fmt.split_param_name(name)[1])
    vocab = name == fmt.TIED_PREFIX + "word_embeddings.weight"
    for state in ("fp32", *MOMENTS):
        entry = {"param": _fit_rows(tensors[state], rows) if vocab else tensors[state]}
        if split is not fmt.TPSplit.replicated:
            entry["cat_dim"] = split.value
        if vocab:
            entry["vocab_tensor"] = True
        torch.save(entry, folder / f"{state}.pt")
    torch.save(tensors["step"], folder / "step.pt")


def export_megds(
    path: str | Path,
    out: str | Path,
    tp: int | None = None,
    pp: int | None = None,
    make_vocab_size_divisible_by: int | None = None,
) -> ExportSummary:
    step_dir, out = resolve_checkpoint(path), Path(out)
    damaged = problems(step_dir)
    if damaged:
        raise CheckpointIntegrityError(step_dir, damaged)
    meta = read_meta(step_dir)
    if meta.get("weights_only"):
        raise ValueError(
            f"{step_dir} holds weights only (an import): a universal checkpoint resumes training, with the "
            "optimizer state; export the weights with `bigscience ckpt export-hf` instead"
        )
    cfg = load_config_file(step_dir / "config.yaml")
    state = TrainState(**json.loads((step_dir / "train_state.json").read_text()))
    layout = {
        "tp": meta["layout"]["tp"] if tp is None else tp,
        "pp": meta["layout"]["pp"] if pp is None else pp,
    }
    found = _layout_problems(cfg, layout["tp"], layout["pp"])
    if found:
        raise ValueError(f"{step_dir} cannot be exported for Megatron-DeepSpeed: " + "; ".join(found))
    target = out / f"global_step{state.step}"
    if target.exists():
        raise FileExistsError(f"{target} exists; choose another output directory or remove it")

    stored = tensors_metadata(step_dir)
    ours = [k[len("model.") :] for k in stored if k.startswith("model.") and k != f"model.{TIED_OUTPUT}"]
    known = megds_names(cfg.model.num_layers)
    unknown = sorted(set(ours) - set(known))
    if unknown:
        raise ValueError(f"{step_dir}: parameters with no Megatron-DeepSpeed equivalent: {unknown}")
    names = {our: known[our] for our in ours}
    divisible = make_vocab_size_divisible_by or cfg.model.make_vocab_size_divisible_by
    vocab = cfg.model.vocab_size
    padded = padded_vocab_size(vocab, divisible, layout["tp"])
    rows = stored["model.transformer.word_embeddings.weight"].size[0]
    schedule = _schedule(cfg, state)

    keys = {
        our: {"fp32": f"model.{our}", **{s: f"optim.state.{our}.{s}" for s in (*MOMENTS, "step")}}
        for our in names
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # One tensor in memory at a time, read in the order they are written.
        stream = iter_tensors(step_dir, [key for per in keys.values() for key in per.values()])
        steps = {}
        for our, per in keys.items():
            tensors = {s: next(stream)[1] for s in per}
            _write_parameter(tmp / "zero" / names[our], names[our], tensors, padded)
            steps[our] = int(tensors["step"])
        (step, *others) = set(steps.values())
        if others:
            raise ValueError(f"{step_dir}: AdamW's step counts differ between parameters: {steps}")
        optimizer_state = _optimizer_state(cfg, state, schedule.next_lr, step)
        save_foreign(optimizer_state, tmp / "zero" / "optimizer_state.pt")
        model_states = {
            **_deepspeed_states(cfg, state, schedule, layout, meta["layout"].get("dp", 1)),
            "args": _megatron_args(cfg, layout, padded, divisible, state, schedule),
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": state.step,
            "tokens": state.consumed_tokens,
            "checkpoint_info": {"padded_vocab_size": padded, "original_vocab_size": vocab},
            "universal_checkpoint_info": _universal_info(list(names.values()), vocab, padded),
        }
        for pp_rank in range(layout["pp"]):
            for tp_rank in range(layout["tp"]):
                save_foreign(model_states, tmp / fmt.mp_rank_file(pp_rank, tp_rank, layout["tp"]))
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for latest in LATEST_FILES:
        atomic_write_text(out / latest, target.name)
    return ExportSummary(target, state.step, layout, (rows, padded), state)
