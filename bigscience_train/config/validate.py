"""Cross-field rules of a run config, checked before any process group starts.

All problems are collected and raised together, each naming the fields and values involved.
"""

from __future__ import annotations

import importlib.util
import math
import signal
from pathlib import Path

from bigscience_train.config.schema import PIPELINE_SCHEDULES, RunConfig
from bigscience_train.data.blend import parse_blend
from bigscience_train.data.sampling import micro_batches_per_step

PROGRESS_MODES = ("auto", "bar", "plain")
WANDB_MODES = ("offline", "online", "disabled")
NO_END = "set train.iters or train.tokens (the run has no end)"
RESUME_MODES = ("auto", "never")


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


def signal_number(name: str) -> signal.Signals:
    """`SIGUSR1` or `USR1` as a signal; a ValueError naming the value otherwise."""
    full = name if name.startswith("SIG") else f"SIG{name}"
    number = getattr(signal, full, None)
    if not isinstance(number, signal.Signals):
        raise ValueError(f"train.stop_signal={name!r} is not a signal name (e.g. SIGUSR1)")
    return number


def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    """parallel.dp when set, else what the world size leaves after tp and pp."""
    if cfg.parallel.dp is not None:
        return cfg.parallel.dp
    return max(world_size // (cfg.parallel.tp * cfg.parallel.pp), 1)


def cluster_world_size(cluster) -> int:
    """Ranks of a job on the cluster preset: nodes x ranks per node."""
    return cluster.nodes * cluster.procs_per_node


def config_problems(cfg: RunConfig, world_size: int = 1) -> list[str]:
    """Every rule the config breaks, as messages naming fields and values. Files are not checked here."""
    m, par, tr, opt = cfg.model, cfg.parallel, cfg.train, cfg.optim
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    for name in ("num_layers", "hidden_size", "num_heads", "seq_length", "vocab_size"):
        need(getattr(m, name) > 0, f"model.{name}={getattr(m, name)} must be positive")
    for name in ("tp", "pp", "virtual_stages"):
        need(getattr(par, name) >= 1, f"parallel.{name}={getattr(par, name)} must be >= 1")
    if problems:
        return problems

    need(
        m.hidden_size % m.num_heads == 0,
        f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}",
    )
    need(
        m.position.value != "rotary" or (m.hidden_size // m.num_heads) % 2 == 0,
        f"model.position=rotary needs an even head size, got hidden_size/num_heads={m.hidden_size / m.num_heads:g}",
    )
    need(
        m.attention.value != "flex" or m.attention_dropout == 0,
        f"model.attention=flex has no attention dropout; model.attention_dropout={m.attention_dropout} must be 0",
    )
    need(m.num_heads % par.tp == 0, f"model.num_heads={m.num_heads} is not divisible by parallel.tp={par.tp}")
    stages = par.pp * par.virtual_stages
    units = m.num_layers + (2 if par.pp_count_embeddings else 0)
    need(
        units % stages == 0,
        f"model.num_layers={m.num_layers}"
        + (" (+2 for embedding and output, parallel.pp_count_embeddings)" if par.pp_count_embeddings else "")
        + f" is not divisible by parallel.pp={par.pp} x parallel.virtual_stages={par.virtual_stages}",
    )
    need(
        par.pp_schedule in PIPELINE_SCHEDULES,
        f"parallel.pp_schedule={par.pp_schedule!r} is not one of {', '.join(PIPELINE_SCHEDULES)}",
    )
    need(
        par.virtual_stages == 1 or par.pp_schedule == "interleaved_1f1b",
        f"parallel.virtual_stages={par.virtual_stages} needs parallel.pp_schedule=interleaved_1f1b",
    )
    need(not par.sequence_parallel or par.tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1")
    need(
        not par.sequence_parallel or m.position.value != "learned",
        "parallel.sequence_parallel=true works with model.position=alibi or rotary, not learned",
    )

    problems += engine_problems(par)
    if par.dp is not None:
        need(par.dp >= 1, f"parallel.dp={par.dp} must be >= 1")
        need(
            par.tp * par.pp * par.dp == world_size,
            f"world size {world_size} != parallel.tp={par.tp} x parallel.pp={par.pp} x parallel.dp={par.dp}",
        )
    else:
        need(
            world_size % (par.tp * par.pp) == 0,
            f"world size {world_size} is not divisible by parallel.tp={par.tp} x parallel.pp={par.pp}",
        )
    dp = data_parallel_size(cfg, world_size)

    mbs, gbs = tr.micro_batch_size, tr.global_batch_size
    need(mbs >= 1, f"train.micro_batch_size={mbs} must be >= 1")
    need(gbs >= 1, f"train.global_batch_size={gbs} must be >= 1")
    if mbs >= 1 and dp >= 1:
        need(
            gbs % (mbs * dp) == 0,
            f"train.global_batch_size={gbs} is not divisible by train.micro_batch_size={mbs} x dp={dp}",
        )
        problems += rampup_problems(list(tr.rampup_batch_size), gbs, mbs * dp)
        if par.pp > 1 and not problems:
            problems += pipeline_problems(par, batch_sizes(gbs, list(tr.rampup_batch_size)), mbs * dp)
    need(tr.iters is not None or tr.tokens is not None, NO_END)
    for name in ("iters", "tokens", "exit_duration_minutes", "exit_interval"):
        value = getattr(tr, name)
        need(value is None or value > 0, f"train.{name}={value} must be positive")
    try:
        signal_number(tr.stop_signal)
    except ValueError as e:
        problems.append(str(e))
    c = cfg.cluster
    need(c.max_restarts >= 0, f"cluster.max_restarts={c.max_restarts} must be >= 0")
    need(
        c.max_restarts == 0 or c.launcher.value == "torchrun",
        f"cluster.max_restarts={c.max_restarts} needs cluster.launcher=torchrun (srun restarts nothing)",
    )
    need(par.timeout_minutes > 0, f"parallel.timeout_minutes={par.timeout_minutes} must be positive")
    need(
        tr.hang_timeout_minutes is None or 0 < tr.hang_timeout_minutes < par.timeout_minutes,
        f"train.hang_timeout_minutes={tr.hang_timeout_minutes} must be positive and less than "
        f"parallel.timeout_minutes={par.timeout_minutes}: the hang watchdog must end the job before the "
        "collective timeout does (or null: no watchdog)",
    )
    need(
        c.health_timeout_seconds > 0,
        f"cluster.health_timeout_seconds={c.health_timeout_seconds} must be positive",
    )
    need(tr.resume in RESUME_MODES, f"train.resume={tr.resume!r} is not one of {', '.join(RESUME_MODES)}")
    problems += skip_iteration_problems([list(r) for r in tr.skip_iterations])
    need(tr.eval_interval >= 1, f"train.eval_interval={tr.eval_interval} must be >= 1")
    need(tr.eval_iters >= 0, f"train.eval_iters={tr.eval_iters} must be >= 0")
    need(tr.eval_tasks_interval >= 1, f"train.eval_tasks_interval={tr.eval_tasks_interval} must be >= 1")
    need(
        not tr.eval_tasks or par.pp == 1,
        f"train.eval_tasks with parallel.pp={par.pp}: zero-shot tasks are scored at tp x dp layouts only",
    )
    need(
        not tr.eval_tasks or str(getattr(par.engine, "value", par.engine)) == "native",
        "train.eval_tasks with parallel.engine=deepspeed: zero-shot tasks score our engine's model only",
    )
    need(cfg.checkpoint.interval >= 1, f"checkpoint.interval={cfg.checkpoint.interval} must be >= 1")
    need(
        cfg.checkpoint.write_threads >= 1,
        f"checkpoint.write_threads={cfg.checkpoint.write_threads} must be >= 1",
    )
    for name in ("keep_last", "keep_every"):
        value = getattr(cfg.checkpoint, name)
        need(value is None or value >= 1, f"checkpoint.{name}={value} must be >= 1 (or null)")
    need(cfg.logging.log_interval >= 1, f"logging.log_interval={cfg.logging.log_interval} must be >= 1")
    need(
        cfg.logging.wandb_mode in WANDB_MODES,
        f"logging.wandb_mode={cfg.logging.wandb_mode!r} is not one of {', '.join(WANDB_MODES)}",
    )
    need(
        cfg.logging.carbon_interval_s > 0,
        f"logging.carbon_interval_s={cfg.logging.carbon_interval_s} must be positive",
    )
    need(
        cfg.logging.progress in PROGRESS_MODES,
        f"logging.progress={cfg.logging.progress!r} is not one of {', '.join(PROGRESS_MODES)}",
    )

    need(opt.lr > 0, f"optim.lr={opt.lr} must be positive")
    need(0 <= opt.min_lr <= opt.lr, f"optim.min_lr={opt.min_lr} must be between 0 and optim.lr={opt.lr}")
    need(opt.warmup_samples >= 0, f"optim.warmup_samples={opt.warmup_samples} must be >= 0")
    need(
        opt.decay_samples is None or opt.decay_tokens is None,
        "set at most one of optim.decay_samples and optim.decay_tokens",
    )
    for name in ("decay_samples", "decay_tokens"):
        value = getattr(opt, name)
        need(value is None or value > 0, f"optim.{name}={value} must be positive")
    need(opt.clip_grad >= 0, f"optim.clip_grad={opt.clip_grad} must be >= 0 (0 disables clipping)")

    try:
        parse_blend(list(cfg.data.blend))
    except ValueError as e:
        problems.append(str(e))
    need(split_shares(cfg.data.split) is not None, split_message("data.split", cfg.data.split))
    problems += valid_set_problems(cfg.data)
    problems += tokenizer_problems(cfg.data)
    return problems


def tokenizer_problems(data) -> list[str]:
    """data.tokenizer (a tokenizer.json) or the GPT-2 pair data.vocab_file and data.merge_file: one of them."""
    gpt2 = [f"data.{name}" for name in ("vocab_file", "merge_file") if getattr(data, name) is not None]
    if data.tokenizer is not None and gpt2:
        return [
            f"data.tokenizer and {' and '.join(gpt2)} are both set: give a tokenizer.json or GPT-2's vocab and "
            "merge files, not both (data.tokenizer=null to use the GPT-2 files)"
        ]
    if len(gpt2) == 1:
        missing = "data.merge_file" if gpt2[0] == "data.vocab_file" else "data.vocab_file"
        return [f"{gpt2[0]} needs {missing} too (GPT-2's vocab.json and merges.txt go together)"]
    if data.tokenizer is None and not gpt2:
        return ["no tokenizer: set data.tokenizer (a tokenizer.json) or data.vocab_file and data.merge_file"]
    return []


def split_shares(split: str) -> list[float] | None:
    """Megatron's split string ('949,50,1', '90/10') as its (train, valid, test) shares; None if malformed."""
    parts = [s for s in str(split).replace("/", ",").split(",") if s.strip()]
    try:
        shares = [float(s) for s in parts]
    except ValueError:
        return None
    if len(shares) > 3 or any(s < 0 for s in shares) or sum(shares) <= 0:
        return None
    return shares + [0.0] * (3 - len(shares))


def split_message(name: str, split: str) -> str:
    return f"{name}={split!r} must be up to 3 non-negative numbers, e.g. '949,50,1'"


def skip_iteration_problems(ranges: list[list[int]]) -> list[str]:
    """train.skip_iterations: [first, last] pairs of positive iterations, first <= last, no two overlapping."""
    problems, good = [], []
    for i, r in enumerate(ranges):
        where = f"train.skip_iterations[{i}]={r}"
        if len(r) != 2:
            problems.append(f"{where} must be [first, last]")
        elif r[0] < 1:
            problems.append(f"{where}: iterations count from 1; first={r[0]} must be positive")
        elif r[0] > r[1]:
            problems.append(f"{where}: first={r[0]} is after last={r[1]}")
        else:
            good.append((r[0], r[1], i))
    good.sort()
    # Each range against the one reaching furthest before it: every range that overlaps an earlier one is named.
    reach: tuple[int, int] | None = None
    for first, last, j in good:
        if reach is not None and first <= reach[0]:
            i = reach[1]
            problems.append(
                f"train.skip_iterations[{i}]={ranges[i]} and [{j}]={ranges[j]} overlap (iteration {first})"
            )
        if reach is None or last > reach[0]:
            reach = (last, j)
    return problems


def valid_set_problems(data) -> list[str]:
    """data.valid: named sets with unique names fit for a metric key, positive weights, a blend, and a split
    whose valid share is not empty."""
    problems, seen = [], set()
    for i, vs in enumerate(data.valid):
        where = f"data.valid[{i}]"
        if not vs.name or any(c.isspace() or c == "/" for c in vs.name):
            problems.append(f"{where}.name={vs.name!r} must be a non-empty name without spaces or '/'")
        elif vs.name in seen:
            problems.append(f"{where}.name={vs.name!r} is used by an earlier set: names are metric keys")
        seen.add(vs.name)
        if not vs.weight > 0:
            problems.append(f"{where}.weight={vs.weight} must be positive")
        try:
            prefixes, _ = parse_blend(list(vs.prefix), f"{where}.prefix")
        except ValueError as e:
            problems.append(str(e))
        else:
            if not prefixes or not prefixes[0]:
                problems.append(f"{where}.prefix is empty: give at least one dataset prefix")
        split = data.split if vs.split is None else vs.split
        shares = split_shares(split)
        if vs.split is not None and shares is None:
            problems.append(split_message(f"{where}.split", vs.split))
        elif shares is not None and shares[1] == 0:
            name = f"{where}.split" if vs.split is not None else "data.split"
            problems.append(f"{name}={split!r} gives {where} ({vs.name}) an empty valid split")
    return problems


def engine_problems(par) -> list[str]:
    """parallel.engine=deepspeed's rules: data parallelism alone, offload with a ZeRO stage, the package."""
    engine, offload, shard = (str(getattr(v, "value", v)) for v in (par.engine, par.offload, par.dp_shard))
    if engine != "deepspeed":
        return [] if offload == "none" else [f"parallel.offload={offload} needs parallel.engine=deepspeed"]
    problems = [
        f"parallel.engine=deepspeed runs data parallelism alone: parallel.{name}={getattr(par, name)} must be 1"
        for name in ("tp", "pp")
        if getattr(par, name) != 1
    ]
    if shard == "none":
        needs = f"parallel.offload={offload}" if offload != "none" else "parallel.engine=deepspeed"
        problems.append(f"{needs} needs a ZeRO stage: set parallel.dp_shard=zero1, zero2 or zero3")
    elif offload == "params" and shard != "zero3":
        problems.append(f"parallel.offload=params needs parallel.dp_shard=zero3, got {shard}")
    if par.zero3_persistence_threshold < 0:
        problems.append(
            f"parallel.zero3_persistence_threshold={par.zero3_persistence_threshold} must be >= 0"
        )
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(
            "parallel.engine=deepspeed needs the deepspeed package: pip install 'bigscience-train[deepspeed]'"
        )
    return problems


def batch_sizes(gbs: int, rampup: list[int]) -> list[int]:
    """Every global batch size a run goes through, ramp-up included."""
    if not rampup:
        return [gbs]
    start, inc, _ = rampup
    return list(range(start, gbs, inc)) + [gbs]


def pipeline_problems(par, sizes: list[int], step: int) -> list[str]:
    """torch.distributed.pipelining's rules on the micro-batches of each step (batch / (micro batch x dp))."""
    problems = []
    for size in sizes:
        micro = micro_batches_per_step(size, step, 1)
        if par.pp_schedule == "1f1b" and micro < par.pp:
            problems.append(
                f"batch size {size} gives {micro} micro-batches (micro batch x dp = {step}): "
                f"parallel.pp_schedule=1f1b needs at least parallel.pp={par.pp}"
            )
        rounds = max(1, micro // par.pp)
        if par.pp_schedule == "interleaved_1f1b" and micro % rounds:
            problems.append(
                f"batch size {size} gives {micro} micro-batches (micro batch x dp = {step}): "
                f"parallel.pp_schedule=interleaved_1f1b needs a multiple of {rounds} (micro-batches // pp)"
            )
    return problems


def rampup_problems(rampup: list[int], gbs: int, step: int) -> list[str]:
    """Megatron's --rampup-batch-size rules; `step` is micro batch x dp, the unit every batch size needs."""
    if not rampup:
        return []
    if len(rampup) != 3:
        return [f"train.rampup_batch_size={rampup} must be [start, increment, ramp_samples]"]
    start, inc, samples = rampup
    problems = []
    if not (0 < start <= gbs):
        problems.append(
            f"train.rampup_batch_size start={start} must be in (0, train.global_batch_size={gbs}]"
        )
    if inc <= 0:
        problems.append(f"train.rampup_batch_size increment={inc} must be positive")
    elif (gbs - start) % inc:
        problems.append(
            f"train.global_batch_size={gbs} - start={start} is not divisible by the ramp-up increment={inc}"
        )
    if samples <= 0:
        problems.append(f"train.rampup_batch_size ramp_samples={samples} must be positive")
    for name, value in (("start", start), ("increment", inc)):
        if value > 0 and value % step:
            problems.append(
                f"train.rampup_batch_size {name}={value} is not divisible by micro batch x dp={step}"
            )
    return problems


def file_problems(cfg: RunConfig) -> list[str]:
    """Inputs a training run reads, checked before it starts."""
    problems = []
    for name in ("tokenizer", "vocab_file", "merge_file"):
        value = cfg.data[name]
        if value is not None and not Path(value).is_file():
            problems.append(f"data.{name}: no such file {value}")
    prefixes, _ = parse_blend(list(cfg.data.blend))
    if not prefixes:
        problems.append("data.blend is empty: give at least one dataset prefix")
    problems += _dataset_file_problems("data.blend", prefixes)
    for i, vs in enumerate(cfg.data.valid):
        try:
            problems += _dataset_file_problems(f"data.valid[{i}].prefix", parse_blend(list(vs.prefix))[0])
        except ValueError:
            continue  # config_problems names it
    return problems


def _dataset_file_problems(name: str, prefixes: list[str]) -> list[str]:
    return [
        f"{name}: no such file {prefix}{suffix}"
        for prefix in prefixes
        for suffix in (".bin", ".idx")
        if not Path(prefix + suffix).is_file()
    ]


def validate(cfg: RunConfig, world_size: int = 1, check_files: bool = False) -> None:
    problems = config_problems(cfg, world_size)
    if check_files and not any(p.startswith("data.blend") for p in problems):
        problems += file_problems(cfg)
    if problems:
        raise ConfigError(problems)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocab rounded up to a multiple of divisible_by * tp (Megatron's _vocab_size_with_padding)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)
