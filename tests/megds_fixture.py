"""Writes a Megatron-DeepSpeed checkpoint with DeepSpeed's own engine, for tests/test_megds_import.py, and
resumes from a universal checkpoint with it, for tests/test_megds_export.py.

`python tests/megds_fixture.py OUT --steps N [--resume DIR] [--tp T] [--pp P] [--zero Z] [--dtype bf16]
    [--vocab-divisible-by D] [--universal] OVERRIDES...`

Two processes on gloo, (tp, pp, dp) any layout of two. A tiny BLOOM laid out as Megatron-DeepSpeed's
GPTModelPipe lays it out (the same layer indices, module and parameter names: a function, the tied embedding,
a function, the transformer layers, a function, the final layernorm, the tied output layer, a function) as a
DeepSpeed PipelineModule on DeepSpeed's PipeModelDataParallelTopology. With tp=2 the layers split as
Megatron's do (vocabulary-parallel embedding, column-parallel query_key_value and dense_h_to_4h,
row-parallel dense and dense_4h_to_h, layernorms and row-parallel biases whole on each rank), with Megatron's
copy / reduce / gather between them. The transformer layer's math is ours (bigscience_train.model.gpt.Block).
The data, learning rate schedule and AdamW settings come from the config our training reads (OVERRIDES),
sample for sample. DeepSpeed trains N steps, saves as Megatron-DeepSpeed does (global_stepN/ with Megatron's
client state: args, iteration, tokens, RNG states, checkpoint_info, universal_checkpoint_info), goes on to
train.iters, and with --universal rank 0 then converts the checkpoint with DeepSpeed's ds_to_universal.

OUT/checkpoints/global_stepN/    what DeepSpeed wrote
OUT/universal/global_stepN/      what ds_to_universal wrote
OUT/truth_stage{S}.pt            per pipeline stage, at step N: the whole fp32 masters and Adam moments by
                                 parameter (DeepSpeed's safe_get_full_* API, gathered over tensor-parallel
                                 ranks), and the loss of every step

With --resume DIR, DeepSpeed's engine (configured with "checkpoint": {"load_universal": true}) loads the
universal checkpoint of step N that DIR/latest_universal names instead, and OUT/truth_stage{S}.pt holds what
it loaded and the losses of the steps from there to train.iters.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import enum
import os
import random
import sys
import types
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigscience_train.config import load_config  # noqa: E402
from bigscience_train.config.validate import padded_vocab_size  # noqa: E402
from bigscience_train.data.gpt_data import build_splits, collate  # noqa: E402
from bigscience_train.data.sampling import micro_batch_indices  # noqa: E402
from bigscience_train.data.tokenizer import Tokenizer  # noqa: E402
from bigscience_train.model import positions  # noqa: E402
from bigscience_train.model.attention import causal_mask  # noqa: E402
from bigscience_train.model.gpt import Block  # noqa: E402
from bigscience_train.model.shape import shape_fields  # noqa: E402
from bigscience_train.schedules import BatchSizeSchedule, LRSchedule, total_train_samples  # noqa: E402

WORLD = 2
# Megatron-DeepSpeed's layer indices: a function, the embedding, a function, then the transformer layers.
FIRST_BLOCK = 3
# This process's tensor-parallel rank and size; the group is the whole world when tp=2.
TP = types.SimpleNamespace(size=1, rank=0)


def without_shm_build() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory collectives op when it first starts (minutes on a cold
    machine) and uses it for inference_all_reduce only: marked unavailable, as on a machine that cannot build
    it, so the training collectives are gloo's in either case."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextlib.contextmanager
def deepspeed_comm(init_file: Path):
    """DeepSpeed's communication set up in this process, on a gloo group of one unless an earlier test left a
    group (DeepSpeed's loss scaler logs an overflow with the process's rank)."""
    import deepspeed

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    without_shm_build()
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False, verbose=False)
    try:
        yield
    finally:
        if own_group:
            dist.destroy_process_group()


def _megatron_enums() -> types.ModuleType:
    """megatron.enums as Megatron-DeepSpeed defines it, so that its args pickle under its real names."""
    module = types.ModuleType("megatron.enums")
    module.PositionEmbeddingType = enum.Enum(
        "PositionEmbeddingType", {"rotary": 1, "absolute": 2, "alibi": 3}
    )
    module.AttnMaskType = enum.Enum("AttnMaskType", {"padding": 1, "causal": 2, "prefix": 3, "custom": 4})
    for cls in (module.PositionEmbeddingType, module.AttnMaskType):
        cls.__module__ = "megatron.enums"
    sys.modules["megatron.enums"] = module
    return module


# -- Megatron's tensor-parallel regions (megatron/mpu/mappings.py) ---------------------------------------------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(TP.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(TP.size, dim=-1)[TP.rank].contiguous()


def copy_to_tp(x):
    return _CopyToTP.apply(x) if TP.size > 1 else x


def reduce_from_tp(x):
    return _ReduceFromTP.apply(x) if TP.size > 1 else x


def gather_from_tp(x):
    return _GatherFromTP.apply(x) if TP.size > 1 else x


def shard(full: torch.Tensor, dim: int) -> nn.Parameter:
    """This rank's part of a whole tensor, split as Megatron splits it (marked for DeepSpeed's grad norm)."""
    param = nn.Parameter(full.detach().chunk(TP.size, dim=dim)[TP.rank].clone())
    param.tensor_model_parallel, param.partition_dim = True, dim
    return param


class ColumnParallelLinear(nn.Module):
    def __init__(self, whole: nn.Linear):
        super().__init__()
        self.weight, self.bias = shard(whole.weight, 0), shard(whole.bias, 0)

    def forward(self, x):
        return F.linear(copy_to_tp(x), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, whole: nn.Linear):
        super().__init__()
        self.weight, self.bias = shard(whole.weight, 1), nn.Parameter(whole.bias.detach().clone())

    def forward(self, x):
        return reduce_from_tp(F.linear(x, self.weight)) + self.bias


# -- GPTModelPipe's layers -------------------------------------------------------------------------------------


class WordEmbedding(nn.Module):
    """Megatron's VocabParallelEmbedding with BigScience's embedding layernorm (`.norm`)."""

    def __init__(self, whole: torch.Tensor, eps: float):
        super().__init__()
        self.weight = shard(whole, 0)
        self.start = TP.rank * self.weight.shape[0]
        self.norm = nn.LayerNorm(whole.shape[1], eps=eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.norm(reduce_from_tp(embedded.masked_fill(outside.unsqueeze(-1), 0.0)))


class EmbeddingPipe(nn.Module):
    def __init__(self, vocab: int, hidden: int, eps: float, std: float, seed: int):
        super().__init__()
        whole = torch.empty(vocab, hidden)
        nn.init.normal_(whole, std=std, generator=torch.Generator().manual_seed(seed))
        self.word_embeddings = WordEmbedding(whole, eps)

    @property
    def word_embeddings_weight(self) -> nn.Parameter:
        return self.word_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(tokens)


class ParallelTransformerLayerPipe(Block):
    """Our block under Megatron's class name (the pipeline partitions on `type:transformer`), initialised
    whole and then split over the tensor-parallel ranks."""

    def __init__(self, shape, layer: int, seed: int):
        super().__init__(shape)
        self.shape = shape
        generator = torch.Generator().manual_seed(seed + layer)
        out_std = shape.init_std / (2.0 * shape.num_layers) ** 0.5
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight"):
                nn.init.ones_(param)
            elif param.ndim == 1:
                nn.init.zeros_(param)
            else:
                std = (
                    out_std
                    if name.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight"))
                    else None
                )
                nn.init.normal_(param, std=std or shape.init_std, generator=generator)
        attention, mlp = self.self_attention, self.mlp
        attention.query_key_value = ColumnParallelLinear(attention.query_key_value)
        attention.dense = RowParallelLinear(attention.dense)
        mlp.dense_h_to_4h = ColumnParallelLinear(mlp.dense_h_to_4h)
        mlp.dense_4h_to_h = RowParallelLinear(mlp.dense_4h_to_h)
        heads = shape.num_heads // TP.size
        slopes = positions.alibi_slopes(shape.num_heads)[TP.rank * heads : (TP.rank + 1) * heads]
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = causal_mask(self.shape.attention, self.slopes, hidden.shape[1], hidden.dtype, hidden.device)
        return super().forward(hidden, mask, None)


def logits(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return gather_from_tp(F.linear(copy_to_tp(hidden), embedding.word_embeddings_weight))


def lm_loss(output: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    targets, mask = labels
    losses = F.cross_entropy(output.float().flatten(0, 1), targets.flatten(), reduction="none")
    mask = mask.flatten().float()
    return (losses * mask).sum() / mask.sum()


def same(x):
    return x


def pipeline(shape, vocab: int, seed: int, topology):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    embed = (vocab, shape.hidden_size, shape.layernorm_epsilon, shape.init_std, seed)
    specs = [
        same,
        TiedLayerSpec("embed", EmbeddingPipe, *embed, tied_weight_attr="word_embeddings_weight"),
        same,
        *(LayerSpec(ParallelTransformerLayerPipe, shape, i, seed) for i in range(shape.num_layers)),
        same,
        LayerSpec(nn.LayerNorm, shape.hidden_size, eps=shape.layernorm_epsilon),
        TiedLayerSpec(
            "embed", EmbeddingPipe, *embed, forward_fn=logits, tied_weight_attr="word_embeddings_weight"
        ),
        same,
    ]
    return PipelineModule(specs, loss_fn=lm_loss, topology=topology, partition_method="type:transformer")


# -- Megatron's state --------------------------------------------------------------------------------------------


class AnnealingLR:
    """Megatron-DeepSpeed's learning rate scheduler as DeepSpeed sees it (its state_dict's keys), counting
    samples; the rate itself is our schedule's."""

    def __init__(self, optimizer, schedule: LRSchedule, batch: int, seq: int, decay_samples: int):
        self.optimizer, self.schedule, self.batch, self.seq = optimizer, schedule, batch, seq
        self.decay_samples = decay_samples
        self.num_steps = self.num_tokens = 0
        self.step(0)

    def step(self, increment: int | None = None) -> None:
        increment = self.batch if increment is None else increment
        self.num_steps += increment
        self.num_tokens += increment * self.seq
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.at(self.num_steps)

    def state_dict(self) -> dict:
        s = self.schedule
        return {
            "max_lr": s.max_lr,
            "warmup_steps": s.warmup,
            "num_steps": self.num_steps,
            "warmup_tokens": 0,
            "num_tokens": self.num_tokens,
            "decay_style": s.style,
            "decay_steps": self.decay_samples,
            "min_lr": s.min_lr,
        }

    def load_state_dict(self, state: dict) -> None:
        self.num_steps, self.num_tokens = state["num_steps"], state["num_tokens"]


def megatron_args(cfg, layout, zero: int, dtype: str, padded_vocab: int, divisible: int, consumed: int):
    enums = sys.modules["megatron.enums"]
    m, o, t = cfg.model, cfg.optim, cfg.train
    tp, pp, dp = layout
    return argparse.Namespace(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=4 * m.hidden_size,
        num_attention_heads=m.num_heads,
        kv_channels=m.hidden_size // m.num_heads,
        seq_length=m.seq_length,
        max_position_embeddings=m.seq_length,
        position_embedding_type=enums.PositionEmbeddingType.alibi,
        embed_layernorm=True,
        apply_residual_connection_post_layernorm=False,
        glu_activation=None,
        layernorm_epsilon=m.layernorm_epsilon,
        init_method_std=m.init_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        make_vocab_size_divisible_by=divisible,
        padded_vocab_size=padded_vocab,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        data_parallel_size=dp,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        rampup_batch_size=None,
        lr=o.lr,
        min_lr=o.min_lr,
        lr_decay_style=o.decay_style.value,
        lr_warmup_samples=o.warmup_samples,
        lr_decay_samples=o.decay_samples,
        lr_decay_tokens=o.decay_tokens,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        fp16=dtype == "fp16",
        bf16=dtype == "bf16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
        zero_stage=zero,
        seed=t.seed,
        consumed_train_samples=consumed,
        consumed_valid_samples=0,
        consumed_train_tokens=consumed * m.seq_length,
        attn_mask_type=enums.AttnMaskType.causal,
        deepspeed=True,
    )


def universal_info(layers: int, vocab: int, padded: int) -> dict:
    """What Megatron-DeepSpeed's GPTModelPipe.universal_checkpoint_info gives ds_to_universal, for this
    model (ALiBi: no position embeddings)."""
    from deepspeed.checkpoint import constants as c

    final = FIRST_BLOCK + layers + 1
    norms = [
        r"tied_modules.embed.word_embeddings.norm.weight",
        r"tied_modules.embed.word_embeddings.norm.bias",
    ]
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.ORIGINAL_VOCAB_SIZE: vocab,
        c.PADDED_VOCAB_SIZE: padded,
        c.VOCABULARY_PARAMETER_PATTERNS: [r"tied_modules.embed.word_embeddings.weight"],
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [r"tied_modules.embed.word_embeddings.weight", *norms],
        c.TP_REPLICATED_PARAMETER_PATTERNS: [
            *norms,
            r"\d+.input_layernorm.weight",
            r"\d+.input_layernorm.bias",
            r"\d+.post_attention_layernorm.weight",
            r"\d+.post_attention_layernorm.bias",
            r"\d+.self_attention.dense.bias",
            r"\d+.mlp.dense_4h_to_h.bias",
            rf"{final}.weight",
            rf"{final}.bias",
        ],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [
            r"\d+.mlp.dense_4h_to_h.weight",
            r"\d+.self_attention.dense.weight",
        ],
    }


def truth_name(name: str, layers: int) -> str:
    """A PipelineModule parameter name as BloomForCausalLM names it (the fixture's own map, apart from the
    importer's)."""
    prefix = "tied_modules.embed.word_embeddings."
    if name.startswith(prefix):
        rest = name.removeprefix(prefix)
        return (
            f"transformer.word_embeddings.{rest}"
            if rest == "weight"
            else f"transformer.word_embeddings_layernorm.{rest[5:]}"
        )
    index, rest = name.split(".", 1)
    if int(index) == FIRST_BLOCK + layers + 1:
        return f"transformer.ln_f.{rest}"
    return f"transformer.h.{int(index) - FIRST_BLOCK}.{rest}"


def relink_optimizer_states(optimizer) -> None:
    """DeepSpeed's ZeRO-1/2 optimizer links its parameters to their Adam moments after the first param
    group's first step and marks every group linked (stage_1_and_2._optimizer_step): the other groups'
    moments, created by their own step a moment later, stay unreachable through safe_get_full_optimizer_state.
    Linking again, with DeepSpeed's own function, once every group has stepped."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def whole(param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """A tensor-parallel shard's state gathered into the whole tensor."""
    if not getattr(param, "tensor_model_parallel", False) or TP.size == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(TP.size)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=param.partition_dim)


def truth(engine, layers: int) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    relink_optimizer_states(engine.optimizer)
    found = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, param in engine.module.named_parameters():
        key = truth_name(name, layers)
        found["fp32"][key] = whole(param, safe_get_full_fp32_param(param))
        for moment in ("exp_avg", "exp_avg_sq"):
            found[moment][key] = whole(param, safe_get_full_optimizer_state(param, moment))
    return found


def start(rank: int, args, init_file: str, **extra_config) -> types.SimpleNamespace:
    """This process's rank of the job: the process group, the config, the DeepSpeed engine (its config with
    extra_config added) and the micro-batches of a step from a number of consumed samples."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    # A rank that fails leaves the other waiting: not for longer than this.
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timeout
    )
    without_shm_build()
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False, verbose=False)
    _megatron_enums()
    dp = WORLD // (args.tp * args.pp)
    topology = PipeModelDataParallelTopology(num_pp=args.pp, num_mp=args.tp, num_dp=dp)
    coord = topology.get_coord(rank)
    TP.size, TP.rank = args.tp, coord.model

    cfg = load_config(args.overrides)
    m, o, t = cfg.model, cfg.optim, cfg.train
    padded = padded_vocab_size(m.vocab_size, args.vocab_divisible_by, args.tp)
    shape = shape_fields(cfg.model)
    schedule = BatchSizeSchedule.from_config(t.global_batch_size, list(t.rampup_batch_size))
    train_samples = total_train_samples(t.iters, t.tokens, m.seq_length, schedule)
    eval_samples = t.eval_iters * t.global_batch_size
    splits = build_splits(
        cfg.data, m.seq_length, Tokenizer(cfg.data.tokenizer), (train_samples, eval_samples, None)
    )

    model = pipeline(shape, padded, t.seed, topology)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)
    decay = o.decay_samples or train_samples
    schedule = LRSchedule(o.lr, o.min_lr, o.warmup_samples, decay, o.decay_style.value)
    lr = AnnealingLR(optimizer, schedule, t.global_batch_size, m.seq_length, decay)
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {"stage": args.zero},
        "bf16": {"enabled": args.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        **extra_config,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr, config=config)

    def batches(consumed: int):
        for indices in micro_batch_indices(consumed, t.global_batch_size, t.micro_batch_size, coord.data, dp):
            b = collate(splits.train, indices)
            yield b["tokens"], (b["labels"], b["loss_mask"])

    return types.SimpleNamespace(engine=engine, cfg=cfg, coord=coord, dp=dp, padded=padded, batches=batches)


def run(rank: int, args, init_file: str) -> None:
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    job = start(rank, args, init_file)
    engine, cfg, coord, dp, padded, batches = job.engine, job.cfg, job.coord, job.dp, job.padded, job.batches
    m, t = cfg.model, cfg.train
    losses, consumed = [], 0
    for step in range(1, t.iters + 1):
        losses.append(engine.train_batch(iter(batches(consumed))).item())
        consumed += t.global_batch_size
        if step == args.steps:
            layout = (args.tp, args.pp, dp)
            state = {
                "args": megatron_args(
                    cfg, layout, args.zero, args.dtype, padded, args.vocab_divisible_by, consumed
                ),
                "checkpoint_version": 3.0,
                "iteration": step,
                "tokens": consumed * m.seq_length,
                "checkpoint_info": {"padded_vocab_size": padded, "original_vocab_size": m.vocab_size},
                UNIVERSAL_CHECKPOINT_INFO: universal_info(m.num_layers, m.vocab_size, padded),
                "random_rng_state": random.getstate(),
                "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(),
            }
            engine.save_checkpoint(
                str(args.out / "checkpoints"), tag=f"global_step{step}", client_state=state
            )
            found = truth(engine, m.num_layers)
    if coord.model == 0 and coord.data == 0:
        torch.save({**found, "losses": losses}, args.out / f"truth_stage{coord.pipe}.pt")
    dist.barrier()
    if args.universal and rank == 0:
        from deepspeed.checkpoint import ds_to_universal

        tag = f"global_step{args.steps}"
        ds_to_universal.main(
            argparse.Namespace(
                input_folder=str(args.out / "checkpoints" / tag),
                output_folder=str(args.out / "universal" / tag),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
        )
    dist.barrier()
    dist.destroy_process_group()


def resume(rank: int, args, init_file: str) -> None:
    """Loads the universal checkpoint in args.resume (its latest_universal names the tag) with DeepSpeed's
    engine, records what the engine holds then (as truth_stage{S}.pt: masters, moments, its step and sample
    counters, the LR scheduler's state and Megatron's client state) and the losses of the steps it trains on
    to train.iters."""
    job = start(rank, args, init_file, checkpoint={"load_universal": True})
    engine, t = job.engine, job.cfg.train
    _, client = engine.load_checkpoint(str(args.resume), load_optimizer_states=True)
    if client["iteration"] != args.steps:
        raise SystemExit(f"{args.resume} holds step {client['iteration']}, not --steps {args.steps}")
    loaded = {
        **truth(engine, job.cfg.model.num_layers),
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "lr_scheduler": engine.lr_scheduler.state_dict(),
        "param_groups": [
            {k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups
        ],
        "iteration": client["iteration"],
        "tokens": client["tokens"],
    }
    losses, consumed = [], client["args"].consumed_train_samples
    for _ in range(args.steps, t.iters):
        losses.append(engine.train_batch(iter(job.batches(consumed))).item())
        consumed += t.global_batch_size
    if job.coord.model == 0 and job.coord.data == 0:
        torch.save({**loaded, "losses": losses}, args.out / f"truth_stage{job.coord.pipe}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, required=True, help="save after this many steps")
    parser.add_argument(
        "--resume", type=Path, help="instead: load this universal checkpoint (of step --steps) and train on"
    )
    parser.add_argument("--tp", type=int, choices=[1, 2], default=1)
    parser.add_argument("--pp", type=int, choices=[1, 2], default=2)
    parser.add_argument("--zero", type=int, default=1, help="ZeRO stage (0 with bf16: BF16_Optimizer)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--vocab-divisible-by", type=int, default=128, help="Megatron's vocabulary padding")
    parser.add_argument("--universal", action="store_true", help="also convert with ds_to_universal")
    parser.add_argument("overrides", nargs="*", help="the config our training reads (Hydra overrides)")
    args = parser.parse_intermixed_args()
    if args.tp * args.pp > WORLD:
        parser.error(f"tp x pp must fit in {WORLD} processes")
    args.out.mkdir(parents=True, exist_ok=True)
    init_file = args.out / ".dist_init"
    init_file.unlink(missing_ok=True)
    # This process is rank 0: it has imported everything already.
    others = mp.start_processes(
        _other_rank, args=(args, str(init_file)), nprocs=WORLD - 1, join=False, daemon=True
    )
    entry(args)(0, args, str(init_file))
    others.join()


def entry(args):
    return resume if args.resume else run


def _other_rank(index: int, args, init_file: str) -> None:
    entry(args)(index + 1, args, init_file)


if __name__ == "__main__":
    main()
