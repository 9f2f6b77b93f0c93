"""`bigscience config from-megds FILE`: a Megatron-DeepSpeed launch as our Hydra overrides and a cluster preset.

Every argument of the launch (Megatron-DeepSpeed's, the DeepSpeed JSON's, the #SBATCH directives and the
launcher's) ends up in an override, with the arithmetic shown where a value is derived (samples to tokens,
iterations to samples), or in the unmapped list with its reason: unknown to us, no equivalent here, or ignored
on purpose. What the launch left to Megatron-DeepSpeed's defaults is written out too (dropout 0.1, weight decay
0.01, linear decay, ...), since ours differ: the overrides reproduce the launch, not our presets.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

from bigscience_train.config.load import load_config
from bigscience_train.config.megds_cluster import map_cluster
from bigscience_train.config.megds_launch import Arg, Launch, LaunchError, file_beside, read_launch
from bigscience_train.config.megds_result import (
    DEFAULT,
    IGNORED,
    NO_EQUIVALENT,
    UNKNOWN,
    Conversion,
    Override,
    Unmapped,
)
from bigscience_train.config.megds_unmapped import DS_ENGINE, NOT_MAPPED
from bigscience_train.config.validate import cluster_world_size, config_problems

DS_FP16_KEYS = (
    "enabled",
    "loss_scale",
    "initial_scale_power",
    "loss_scale_window",
    "hysteresis",
    "min_loss_scale",
)
DS_LOGGING = (
    "steps_per_print",
    "wall_clock_breakdown",
    "zero_allow_untested_optimizer",
    "prescale_gradients",
)


class _Mapper:
    """Maps the launch concern by concern; each argument it reads becomes an override or an unmapped entry."""

    def __init__(self, launch: Launch):
        self.launch = launch
        self.args: dict[str, Arg] = {}
        self.notes: list[str] = []
        for arg in launch.args:
            earlier = self.args.get(arg.key)
            if earlier is not None and earlier.values != arg.values:
                self.notes.append(
                    f"{arg.name} is given twice ({earlier.text!r} at line {earlier.line}, {arg.text!r} at "
                    f"line {arg.line}): the last counts, as with argparse"
                )
            self.args[arg.key] = arg
        self.used: set[str] = set()
        self.overrides: list[Override] = []
        self.unmapped: list[Unmapped] = []
        self.deepspeed = "--deepspeed" in self.args
        self.ds = launch.ds_config if self.deepspeed else None
        self.ds_used: set[str] = set()

    # -- helpers ----------------------------------------------------------------------------------------------

    def take(self, key: str) -> Arg | None:
        self.used.add(key)
        return self.args.get(key)

    def error(self, arg: Arg, message: str) -> LaunchError:
        return LaunchError(f"{self.launch.path}:{arg.line}: {arg.name} {message}")

    def number(self, arg: Arg, kind=int):
        if len(arg.values) != 1:
            raise self.error(arg, f"takes one value, got {arg.text!r}")
        try:
            return kind(arg.values[0])
        except ValueError:
            unset = " (a shell variable this file does not set)" if "$" in arg.text else ""
            what = "an integer" if kind is int else "a number"
            raise self.error(arg, f"takes {what}, got {arg.text!r}{unset}") from None

    def ds_number(self, key: str, value, kind):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and kind(value) == value:
            return kind(value)
        what = "an integer" if kind is int else "a number"
        raise LaunchError(
            f"{self.launch.path}: the DeepSpeed config ({self.launch.ds_config_source}) has {key}={value!r}, not {what}"
        )

    def int_arg(self, key: str, default):
        arg = self.args.get(key)
        return self.number(arg) if arg is not None else default

    def set(self, key: str, value, source: str, how: str | None = None) -> None:
        self.overrides.append(Override(key, value, source, how))

    def setting(self, key: str, arg_key: str, kind, default):
        """`key` from the argument (marked used), or `default` as Megatron's when the launch lacks it; None
        sets nothing."""
        arg = self.take(arg_key)
        if arg is None:
            value, source = default, DEFAULT
        else:
            value = True if kind is bool else arg.text if kind is str else self.number(arg, kind)
            source = arg.name
        if value is not None:
            self.set(key, value, source)
        return value

    def skip(self, arg: Arg | None, kind: str, reason: str) -> None:
        if arg is not None:
            self.used.add(arg.key)
            self.unmapped.append(Unmapped(arg.name, arg.text, kind, reason, arg.line, "megatron"))

    def skip_ds(self, key: str, value, kind: str, reason: str) -> None:
        self.unmapped.append(Unmapped(key, repr(value), kind, reason, None, "deepspeed"))

    # -- concerns ---------------------------------------------------------------------------------------------

    def model(self) -> None:
        job = next((d.value for d in self.launch.sbatch if d.name == "job-name"), None)
        self.set("model.name", job or self.launch.path.stem, "#SBATCH --job-name" if job else "the file name")
        seq_key = "--seq-length" if "--seq-length" in self.args else "--encoder-seq-length"
        self.used.add("--encoder-seq-length")
        shape = {
            name: self.setting(f"model.{name}", key, int, None)
            for name, key in (
                ("num_layers", "--num-layers"),
                ("hidden_size", "--hidden-size"),
                ("num_heads", "--num-attention-heads"),
                ("seq_length", seq_key),
            )
        }
        missing = [name for name, value in shape.items() if value is None]
        if missing:
            self.notes.append(f"the launch does not give model.{', model.'.join(missing)}: the preset's stay")
        hidden, heads, seq = shape["hidden_size"], shape["num_heads"], shape["seq_length"]
        self.same_or_skip("--ffn-hidden-size", 4 * hidden if hidden else None, "our MLP is 4 x hidden_size")
        self.same_or_skip(
            "--kv-channels", hidden // heads if hidden and heads else None, "heads are h / n wide"
        )

        kind_arg = self.take("--position-embedding-type")
        kind = kind_arg.text if kind_arg else "absolute"
        position = {"absolute": "learned", "alibi": "alibi", "rotary": "rotary"}.get(kind)
        if position is None:
            self.skip(kind_arg, NO_EQUIVALENT, "ours: absolute (learned), alibi or rotary")
        else:
            self.set("model.position", position, kind_arg.name if kind_arg else DEFAULT)
        table = self.take("--max-position-embeddings")
        if table is not None and seq is not None and self.number(table) != seq:
            if position == "learned":
                self.skip(table, NO_EQUIVALENT, f"learned positions have model.seq_length={seq} rows")
            else:
                self.skip(table, IGNORED, f"{kind} positions have no position table")

        self.setting("model.embedding_layernorm", "--embed-layernorm", bool, False)
        self.setting("model.init_std", "--init-method-std", float, 0.02)
        self.setting("model.layernorm_epsilon", "--layernorm-epsilon", float, 1e-5)
        self.setting("model.hidden_dropout", "--hidden-dropout", float, 0.1)
        self.setting("model.attention_dropout", "--attention-dropout", float, 0.1)
        self.set("model.tie_embeddings", True, "Megatron's GPT (its output layer is the word embedding)")
        self.vocabulary()

    def same_or_skip(self, key: str, ours: int | None, reason: str) -> None:
        arg = self.take(key)
        if arg is not None and self.number(arg) != ours:
            self.skip(arg, NO_EQUIVALENT, f"{reason} (= {ours})")

    def vocabulary(self) -> None:
        divisible_arg = self.take("--make-vocab-size-divisible-by")
        divisible = self.number(divisible_arg) if divisible_arg else 128
        tp = self.int_arg("--tensor-model-parallel-size", self.int_arg("--model-parallel-size", 1))
        pad, tokenizer = self.take("--pad-vocab-size-to"), self.take("--tokenizer-type")
        vocab_file = self.args.get("--vocab-file")
        gpt2 = vocab_file is not None and "gpt2" in Path(vocab_file.text).name
        source, how = (divisible_arg.name if divisible_arg else DEFAULT), None
        if pad is not None:
            size = self.number(pad)
            self.set("model.vocab_size", size, pad.name)
            if size % (divisible * tp):
                how = f"{size} is not a multiple of {divisible} x tp {tp}: padding to a multiple of 1 x tp keeps it"
                divisible, source = 1, pad.name
        elif gpt2 and (tokenizer is None or tokenizer.text == "GPT2BPETokenizer"):
            self.set("model.vocab_size", 50257, "--vocab-file (GPT-2's BPE vocabulary: 50,257 tokens)")
        else:
            self.notes.append(
                "the launch does not give the vocabulary size: set model.vocab_size to the tokenizer's"
            )
        self.set("model.make_vocab_size_divisible_by", divisible, source, how)
        self.tokenizer_files(tokenizer)

    def tokenizer_files(self, tokenizer: Arg | None) -> None:
        """GPT2BPETokenizer's --vocab-file and --merge-file are ours too; other tokenizers need a tokenizer.json."""
        vocab, merges = self.take("--vocab-file"), self.take("--merge-file")
        gpt2_bpe = tokenizer is None or tokenizer.text == "GPT2BPETokenizer"
        if gpt2_bpe and vocab is not None and merges is not None:
            self.set(
                "data.tokenizer", None, vocab.name, "GPT-2's vocab and merge files replace a tokenizer.json"
            )
            self.set("data.vocab_file", vocab.text, vocab.name)
            self.set("data.merge_file", merges.text, merges.name)
            return
        for arg in (vocab, merges):
            if gpt2_bpe:
                self.skip(arg, NO_EQUIVALENT, "GPT-2's vocab.json and merges.txt go together")
            else:
                self.skip(arg, IGNORED, f"only GPT2BPETokenizer reads it, not {tokenizer.text}")
        self.skip(
            tokenizer,
            NO_EQUIVALENT,
            "data.tokenizer is a Hugging Face tokenizer.json (or GPT-2's vocab and merges)",
        )
        self.notes.append("data.tokenizer keeps the data preset's: set data.tokenizer=PATH/tokenizer.json")

    def parallel(self) -> None:
        tp_key = (
            "--tensor-model-parallel-size"
            if "--tensor-model-parallel-size" in self.args
            else "--model-parallel-size"
        )
        self.used.add("--model-parallel-size")
        self.setting("parallel.tp", tp_key, int, 1)
        pp = self.setting("parallel.pp", "--pipeline-model-parallel-size", int, 1)
        virtual = self.take("--num-layers-per-virtual-pipeline-stage")
        layers = self.int_arg("--num-layers", None)
        if virtual is not None:
            per_stage = self.number(virtual)
            if layers and layers % (pp * per_stage) == 0:
                stages = layers // (pp * per_stage)
                how = f"--num-layers {layers} / (pp {pp} x {per_stage} layers per virtual stage) = {stages}"
                self.set("parallel.pp_schedule", "interleaved_1f1b", virtual.name)
                self.set("parallel.virtual_stages", stages, virtual.name, how)
            else:
                self.skip(virtual, NO_EQUIVALENT, f"num_layers={layers} is not divisible by pp x {per_stage}")
        method = self.take("--pp-partition-method")
        if method is not None:
            parts = sorted(p.strip() for p in method.text.removeprefix("type:").split("|"))
            if method.text.startswith("type:") and parts in (["transformer"], ["embedding", "transformer"]):
                self.set("parallel.pp_count_embeddings", parts != ["transformer"], method.name)
            else:
                self.skip(method, NO_EQUIVALENT, "ours splits layers evenly (parallel.pp_count_embeddings)")
        checkpointing = self.take("--checkpoint-activations")
        self.set(
            "parallel.recompute",
            "full" if checkpointing else "none",
            checkpointing.name if checkpointing else DEFAULT,
        )
        chunk = self.take("--checkpoint-num-layers")
        if chunk is not None and self.number(chunk) != 1:
            self.skip(chunk, NO_EQUIVALENT, "full recompute checkpoints every layer")
        if self.take("--accumulate-allreduce-grads-in-fp32") is not None:
            self.set("parallel.reduce_dtype", "fp32", "--accumulate-allreduce-grads-in-fp32")

    def zero(self, dtype: str) -> None:
        stage_arg = self.take("--zero-stage")
        zero = (self.ds or {}).get("zero_optimization")
        if zero is not None:
            self.ds_used.add("zero_optimization")
            stage = self.ds_number("zero_optimization.stage", zero.get("stage", 0), int)
            source = "DeepSpeed zero_optimization.stage"
            for key, value in zero.items():
                if key in ("offload_optimizer", "offload_param", "cpu_offload"):
                    self.skip_ds(f"zero_optimization.{key}", value, NO_EQUIVALENT, "no ZeRO-Offload here")
                elif key != "stage":
                    self.skip_ds(f"zero_optimization.{key}", value, IGNORED, DS_ENGINE)
            if stage_arg is not None and int(self.number(stage_arg, float)) != stage:
                self.notes.append(
                    f"--zero-stage {stage_arg.text} differs from the DeepSpeed config's stage {stage}: the config's counts"
                )
        elif self.deepspeed and stage_arg is not None:
            stage, source = int(self.number(stage_arg, float)), stage_arg.name
        else:
            stage, source = 0, "no DeepSpeed ZeRO config read"
        if stage not in (0, 1, 2, 3):
            raise LaunchError(f"{self.launch.path}: ZeRO stage {stage} is not 0-3")
        how = f"DeepSpeed ZeRO stage {stage}"
        if stage == 0 and dtype == "bf16" and self.deepspeed:
            # Megatron-DeepSpeed's bf16 requires stage 0, which runs BF16_Optimizer: its own ZeRO-1.
            how = "ZeRO stage 0 with bf16 runs DeepSpeed's BF16_Optimizer, which shards the fp32 masters and optimizer states over dp: ZeRO-1's layout"
            stage = 1
        self.set("parallel.dp_shard", ("none", "zero1", "zero2", "zero3")[stage], source, how)

    def precision(self) -> str:
        fp16, bf16 = self.take("--fp16") is not None, self.take("--bf16") is not None
        dtype = "fp16" if fp16 else "bf16" if bf16 else "fp32"
        source = "--fp16" if fp16 else "--bf16" if bf16 else DEFAULT
        if self.ds is not None:
            sections = {name: self.ds.get(name) or {} for name in ("fp16", "bf16", "bfloat16")}
            self.ds_used.update(sections)
            enabled = [name for name, section in sections.items() if section.get("enabled")]
            ds_dtype = "fp16" if "fp16" in enabled else "bf16" if enabled else "fp32"
            if ds_dtype != dtype:
                self.notes.append(
                    f"the DeepSpeed config trains in {ds_dtype}, the arguments in {dtype}: the config's counts"
                )
            dtype, source = (
                ds_dtype,
                f"DeepSpeed {enabled[0]}.enabled" if enabled else "DeepSpeed config (no fp16, bf16)",
            )
        self.set("precision", dtype, source)
        scaling = (
            "--loss-scale",
            "--initial-loss-scale",
            "--min-loss-scale",
            "--loss-scale-window",
            "--hysteresis",
        )
        if dtype != "fp16" or self.deepspeed:
            why = (
                "only fp16 scales the loss"
                if dtype != "fp16"
                else "under --deepspeed the DeepSpeed config's fp16 section scales the loss"
            )
            for key in scaling:
                self.skip(self.args.get(key), IGNORED, why)
        if dtype == "fp16" and self.deepspeed and self.ds is None:
            self.notes.append(
                "fp16 loss scaling is set in the DeepSpeed config, which was not read: precision.* keep the fp16 preset's"
            )
        elif dtype == "fp16" and self.deepspeed:
            self.ds_loss_scaling(self.ds.get("fp16") or {})
        elif dtype == "fp16":
            self.megatron_loss_scaling()
        return dtype

    def ds_loss_scaling(self, section: dict) -> None:
        for key, value in section.items():
            if key == "loss_scale" and value:
                self.skip_ds("fp16.loss_scale", value, NO_EQUIVALENT, "a static loss scale; ours is dynamic")
            elif key not in DS_FP16_KEYS:
                self.skip_ds(
                    f"fp16.{key}", value, UNKNOWN, "not a DeepSpeed fp16 setting this converter knows"
                )
        if "initial_scale_power" in section:
            self.set(
                "precision.initial_scale_power",
                self.ds_number("fp16.initial_scale_power", section["initial_scale_power"], int),
                "DeepSpeed fp16.initial_scale_power",
            )
        else:
            self.notes.append(
                "the DeepSpeed config does not set fp16.initial_scale_power (DeepSpeed's default changed "
                "between versions): precision.initial_scale_power keeps the preset's"
            )
        for key, default, kind in (
            ("loss_scale_window", 1000, int),
            ("hysteresis", 2, int),
            ("min_loss_scale", 1.0, float),
        ):
            source = f"DeepSpeed fp16.{key}" if key in section else "DeepSpeed default"
            self.set(
                f"precision.{key}", self.ds_number(f"fp16.{key}", section.get(key, default), kind), source
            )

    def megatron_loss_scaling(self) -> None:
        self.skip(self.args.get("--loss-scale"), NO_EQUIVALENT, "a static loss scale; ours is dynamic")
        initial_arg = self.take("--initial-loss-scale")
        initial = self.number(initial_arg, float) if initial_arg else 2.0**32
        power = math.log2(initial) if initial >= 1 else 0.5
        if power == int(power):
            source = initial_arg.name if initial_arg else DEFAULT
            self.set("precision.initial_scale_power", int(power), source, f"log2({initial:g}) = {int(power)}")
        else:
            self.skip(
                initial_arg, NO_EQUIVALENT, "ours starts at a power of two (precision.initial_scale_power)"
            )
        self.setting("precision.loss_scale_window", "--loss-scale-window", lambda v: int(float(v)), 1000)
        self.setting("precision.hysteresis", "--hysteresis", int, 2)
        self.setting("precision.min_loss_scale", "--min-loss-scale", float, 1.0)

    def batches(self) -> None:
        mbs_key = "--micro-batch-size" if "--micro-batch-size" in self.args else "--batch-size"
        self.used.add("--batch-size")
        mbs = self.setting("train.micro_batch_size", mbs_key, int, None)
        gbs = self.setting("train.global_batch_size", "--global-batch-size", int, None)
        if gbs is None:
            self.notes.append(
                "no --global-batch-size: Megatron used micro batch x dp; set train.global_batch_size"
            )
        ds = self.ds or {}
        for key, ours, name in (
            ("train_micro_batch_size_per_gpu", mbs, mbs_key),
            ("train_batch_size", gbs, "--global-batch-size"),
        ):
            if key in ds:
                self.ds_used.add(key)
                if ours is not None and ds[key] != ours:
                    self.notes.append(
                        f"the DeepSpeed config's {key}={ds[key]} differs from {name} {ours}: the argument counts"
                    )
        if "gradient_accumulation_steps" in ds:
            self.ds_used.add("gradient_accumulation_steps")
            why = "ours derives it: global batch / (micro batch x dp)"
            self.skip_ds("gradient_accumulation_steps", ds["gradient_accumulation_steps"], IGNORED, why)
        rampup = self.take("--rampup-batch-size")
        if rampup is not None:
            if len(rampup.values) != 3:
                raise self.error(rampup, f"takes start, increment and ramp-up samples, got {rampup.text!r}")
            self.set(
                "train.rampup_batch_size",
                [self.number(Arg(rampup.name, [v], rampup.line)) for v in rampup.values],
                rampup.name,
            )
        iters = self.setting("train.iters", "--train-iters", int, None)
        self.run_length(iters)
        self.setting("train.exit_interval", "--exit-interval", int, None)
        self.setting("train.exit_duration_minutes", "--exit-duration-in-mins", float, None)

    def run_length(self, iters: int | None) -> None:
        """train.tokens from --train-samples (samples x seq_length) and --train-tokens, the smaller if both."""
        samples, tokens = self.take("--train-samples"), self.take("--train-tokens")
        limits = []
        if samples is not None:
            count, seq = (
                self.number(samples),
                self.int_arg("--seq-length", self.int_arg("--encoder-seq-length", None)),
            )
            if seq is None:
                raise self.error(samples, "needs --seq-length to count tokens")
            limits.append(
                (
                    count * seq,
                    samples.name,
                    f"--train-samples {count:_} x --seq-length {seq} = {count * seq:_} tokens",
                )
            )
        if tokens is not None:
            limits.append((self.number(tokens), tokens.name, None))
        if limits:
            value, source, how = min(limits)
            if len(limits) > 1:
                how = "the smaller of --train-samples x --seq-length and --train-tokens: Megatron stops at the first"
            self.set("train.tokens", value, source, how)
        elif iters is None:
            self.notes.append(
                "no --train-iters, --train-samples or --train-tokens: set train.iters or train.tokens"
            )

    def optimizer(self) -> None:
        kind = self.take("--optimizer")
        if kind is not None and kind.text != "adam":
            self.skip(kind, NO_EQUIVALENT, "the optimizer is AdamW (Megatron's adam)")
        self.skip(self.args.get("--sgd-momentum"), IGNORED, "used by --optimizer sgd only")
        if self.setting("optim.lr", "--lr", float, None) is None:
            self.notes.append("no --lr: optim.lr keeps the preset's")
        self.setting("optim.min_lr", "--min-lr", float, 0.0)
        self.setting("optim.beta1", "--adam-beta1", float, 0.9)
        self.setting("optim.beta2", "--adam-beta2", float, 0.999)
        self.setting("optim.eps", "--adam-eps", float, 1e-8)
        self.setting("optim.weight_decay", "--weight-decay", float, 0.01)
        clip_arg = self.take("--clip-grad")
        if self.ds is not None:
            # The DeepSpeed engine clips by its config (no clipping when it says nothing), not by --clip-grad.
            clip = self.ds_number("gradient_clipping", self.ds.get("gradient_clipping", 0.0), float)
            self.ds_used.add("gradient_clipping")
            in_ds = "gradient_clipping" in self.ds
            self.set(
                "optim.clip_grad",
                clip,
                "DeepSpeed gradient_clipping" if in_ds else "DeepSpeed default (none)",
            )
            if clip_arg is not None and self.number(clip_arg, float) != clip:
                self.notes.append(
                    f"--clip-grad {clip_arg.text} differs from the DeepSpeed config's gradient_clipping {clip}: DeepSpeed's counts"
                )
        else:
            self.setting("optim.clip_grad", "--clip-grad", float, 1.0)
        style_arg = self.take("--lr-decay-style")
        style = style_arg.text if style_arg else "linear"
        if style in ("cosine", "linear", "constant"):
            self.set("optim.decay_style", style, style_arg.name if style_arg else DEFAULT)
        else:
            self.skip(style_arg, NO_EQUIVALENT, "ours: cosine, linear or constant")
        self.lr_schedule()

    def lr_schedule(self) -> None:
        """Warmup and decay lengths in samples, as Megatron's get_learning_rate_scheduler computes them: with
        --train-iters from the *-iters arguments x global batch, with --train-samples from the *-samples ones."""
        gbs = self.int_arg("--global-batch-size", None)
        by_iters = "--train-iters" in self.args
        unit = "iters" if by_iters else "samples"
        for key in (
            ("--lr-decay-samples", "--lr-warmup-samples")
            if by_iters
            else ("--lr-decay-iters", "--lr-warmup-iters")
        ):
            self.skip(
                self.args.get(key),
                IGNORED,
                f"Megatron reads it only with --train-{'samples' if by_iters else 'iters'}",
            )
        decay_arg, warmup_arg = self.take(f"--lr-decay-{unit}"), self.take(f"--lr-warmup-{unit}")
        decay = self.samples(decay_arg, gbs, by_iters, "optim.decay_samples")
        tokens = self.take("--lr-decay-tokens")
        if tokens is not None:
            self.set("optim.decay_tokens", self.number(tokens), tokens.name)
            if decay is not None:
                self.overrides = [o for o in self.overrides if o.key != "optim.decay_samples"]
                self.notes.append(
                    f"--lr-decay-tokens replaces {decay_arg.name} in Megatron-DeepSpeed's schedule"
                )
        if decay is None:
            train = self.int_arg("--train-iters", None)
            decay = train * gbs if by_iters and train and gbs else self.int_arg("--train-samples", None)
        fraction = self.take("--lr-warmup-fraction")
        if fraction is not None:
            share = self.number(fraction, float)
            if decay is None:
                raise self.error(fraction, "needs a decay length (--train-samples or --lr-decay-samples)")
            warmup = round(share * decay)
            self.set(
                "optim.warmup_samples",
                warmup,
                fraction.name,
                f"--lr-warmup-fraction {share:g} x {decay:_} decay samples = {warmup:_}",
            )
            self.skip(warmup_arg, IGNORED, "--lr-warmup-fraction takes precedence in Megatron")
        elif self.samples(warmup_arg, gbs, by_iters, "optim.warmup_samples") is None:
            self.set("optim.warmup_samples", 0, DEFAULT)

    def samples(self, arg: Arg | None, gbs: int | None, by_iters: bool, key: str) -> int | None:
        """Sets `key` to the argument's length in samples (iterations x global batch when by_iters)."""
        if arg is None:
            return None
        n = self.number(arg)
        if not by_iters:
            self.set(key, n, arg.name)
            return n
        if gbs is None:
            raise self.error(arg, "needs --global-batch-size to count samples")
        self.set(
            key, n * gbs, arg.name, f"{arg.name} {n:_} x --global-batch-size {gbs} = {n * gbs:_} samples"
        )
        return n * gbs

    def data(self) -> None:
        path = self.take("--data-path")
        if path is not None:
            self.set("data.blend", list(path.values), path.name)
            split = self.take("--split")
            self.set(
                "data.split",
                (split.text if split else "969,30,1").replace(" ", ""),
                split.name if split else DEFAULT,
            )
        else:
            self.skip(self.args.get("--split"), IGNORED, "without --data-path Megatron reads no split")
            self.notes.append("no --data-path: data.blend keeps the data preset's; set data.blend=[...]")
        # Off by default in Megatron as here: set only when the launch turns them on.
        for flag in ("eod_mask_loss", "reset_position_ids", "reset_attention_mask"):
            self.setting(f"data.{flag}", "--" + flag.replace("_", "-"), bool, None)
        seed = self.setting("train.seed", "--seed", int, 1234)
        self.set("data.seed", seed, self.overrides[-1].source, "Megatron's --seed seeds the data shuffle too")
        impl = self.args.get("--data-impl")
        if impl is not None and impl.text not in ("mmap", "infer"):
            self.skip(impl, NO_EQUIVALENT, "ours reads the mmap .bin/.idx format only")
        loader = self.args.get("--dataloader-type")
        if loader is not None and loader.text == "cyclic":
            self.skip(loader, NO_EQUIVALENT, "ours reads the samples once, in order (single)")

    def skipped_iterations(self) -> None:
        """--skip-train-iteration-range START-END ... as train.skip_iterations, overlapping ranges merged as
        Megatron-DeepSpeed merges them (ours refuses overlaps)."""
        arg = self.take("--skip-train-iteration-range")
        if arg is None:
            return
        ranges: list[list[int]] = []
        for value in arg.values:
            first, _, last = value.partition("-")
            try:
                ranges.append([int(first), int(last)])
            except ValueError:
                raise self.error(arg, f"takes START-END ranges, got {value!r}") from None
        merged: list[list[int]] = []
        for first, last in sorted(ranges):
            if merged and merged[-1][1] >= first:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        how = "overlapping ranges merged, as Megatron-DeepSpeed does" if len(merged) < len(ranges) else None
        self.set("train.skip_iterations", merged, arg.name, how)

    def validation_sets(self) -> None:
        """--valid-weighted-split-paths (or the file --valid-weighted-split-paths-path names, read when it is
        beside the launch) as data.valid: each group `NAME: WEIGHT START:END PATH, ...` one named set."""
        arg = self.take("--valid-weighted-split-paths")
        from_file = self.take("--valid-weighted-split-paths-path")
        if arg is not None:
            groups = arg.values
        elif from_file is not None:
            found = file_beside(self.launch.path, from_file.text)
            if found is None:
                reason = f"no such file next to {self.launch.path.name}: write its groups as data.valid"
                self.skip(from_file, NO_EQUIVALENT, reason)
                return
            # Megatron-DeepSpeed's format: one line of double-quoted groups.
            groups = shlex.split(found.read_text())
            arg = from_file
        else:
            return
        sets = [self.validation_set(arg, group) for group in groups]
        how = "one set per group: its datasets' weights, and START:END as the valid share of the split"
        self.set("data.valid", sets, arg.name, how)

    def validation_set(self, arg: Arg, group: str) -> dict:
        name, _, rest = group.partition(":")
        blend, ranges = [], set()
        for dataset in rest.split(","):
            words = dataset.split()
            try:
                weight, span, path = words
                start, end = (float(x) for x in span.split(":"))
                blend += [str(float(weight)), path]
            except ValueError:
                raise self.error(arg, f"group {group!r}: each dataset is WEIGHT START:END PATH") from None
            ranges.add((start, end))
        if len(ranges) != 1:
            raise self.error(
                arg, f"group {name!r} reads different ranges {sorted(ranges)}: one range per set here"
            )
        ((start, end),) = ranges
        prefix = blend[1:] if len(blend) == 2 else blend
        return {"name": name.strip(), "prefix": prefix, "split": f"{start:g},{end - start:g},{1 - end:g}"}

    def outputs(self) -> None:
        self.setting("logging.log_interval", "--log-interval", int, 100)
        self.setting("train.eval_interval", "--eval-interval", int, 1000)
        self.setting("train.eval_iters", "--eval-iters", int, 100)
        for key, name, folder in (
            ("--tensorboard-dir", "tensorboard", "tensorboard"),
            ("--codecarbon-dir", "carbon", "carbon"),
        ):
            arg = self.take(key)
            if arg is not None:
                self.set(f"logging.{name}", True, arg.name, f"ours writes RUN/{folder}/")
        if self.setting("checkpoint.interval", "--save-interval", int, None) is None:
            self.notes.append(
                "no --save-interval: Megatron saved only at the end; checkpoint.interval keeps ours"
            )
        save, load = self.take("--save"), self.take("--load")
        self.skip(save, IGNORED, "checkpoints go to RUN/checkpoints/ (set run_dir)")
        if load is not None and save is not None and load.text == save.text:
            self.skip(
                load, IGNORED, "a restarted job resumes from RUN/checkpoints/latest (train.resume=auto)"
            )
        else:
            self.skip(load, NO_EQUIVALENT, "train.load takes a checkpoint of ours: convert this one first")
        if self.take("--finetune") is not None:
            self.set("train.finetune", True, "--finetune", "with train.load set to the converted checkpoint")
        self.setting("train.kill_switch", "--kill-switch-path", str, None)

    def deepspeed_rest(self) -> None:
        self.used.update(("--deepspeed-config", "--deepscale-config"))
        arg = self.take("--deepspeed")
        if arg is not None and self.ds is not None:
            self.skip(
                arg,
                IGNORED,
                "the engine is ours; its config was read for precision, ZeRO, batch sizes and clipping",
            )
        elif arg is not None:
            problem = self.launch.ds_config_problem or "no --deepspeed_config"
            self.skip(arg, IGNORED, f"the engine is ours; its config was not read ({problem})")
        elif self.launch.ds_config is not None:
            self.notes.append(
                "a DeepSpeed config is given without --deepspeed: Megatron does not use it, nor do we"
            )
        for key, value in (self.ds or {}).items():
            if key in self.ds_used:
                continue
            if key in DS_LOGGING:
                self.skip_ds(key, value, IGNORED, "DeepSpeed's own logging and checks")
            elif key in ("optimizer", "scheduler"):
                self.skip_ds(
                    key, value, NO_EQUIVALENT, "the optimizer and schedule come from the arguments here"
                )
            else:
                self.skip_ds(key, value, UNKNOWN, "not a DeepSpeed setting this converter knows")

    def rest(self) -> None:
        for key, arg in self.args.items():
            if key not in self.used:
                kind, reason = NOT_MAPPED.get(
                    key, (UNKNOWN, "not a Megatron-DeepSpeed GPT argument this converter knows")
                )
                self.skip(arg, kind, reason)


def convert(path: str | Path) -> Conversion:
    """The overrides, unmapped arguments and notes for the Megatron-DeepSpeed launch in this file."""
    launch = read_launch(path)
    m = _Mapper(launch)
    m.model()
    m.parallel()
    m.zero(m.precision())
    m.batches()
    m.optimizer()
    m.data()
    m.validation_sets()
    m.skipped_iterations()
    m.outputs()
    m.deepspeed_rest()
    m.rest()
    cluster = map_cluster(launch)
    conversion = Conversion(
        launch.path,
        launch.line,
        launch.ds_config_source,
        cluster.preset,
        m.overrides + cluster.overrides,
        m.unmapped + cluster.unmapped,
        m.notes + cluster.notes,
    )
    written = " ".join([*(o.text for o in conversion.overrides), *(u.value for u in conversion.unmapped)])
    unresolved = [name for name in launch.unresolved if re.search(rf"\$\{{?{name}(?!\w)", written)]
    if unresolved:
        conversion.notes.append(
            f"shell variables set outside {launch.path.name} stay as written: {', '.join(unresolved)}"
        )
    if launch.ds_config_problem and m.deepspeed:
        conversion.notes.append(f"DeepSpeed config not read: {launch.ds_config_problem}")
    return conversion


def check(conversion: Conversion) -> tuple[int, list[str]]:
    """The world size of the job the overrides describe, and every rule of ours the config breaks there."""
    cfg = load_config(conversion.lines)
    world = cluster_world_size(cfg.cluster)
    return world, config_problems(cfg, world)
