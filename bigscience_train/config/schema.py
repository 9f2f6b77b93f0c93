"""Typed structured config of a run. Hydra's YAML tree in bigscience_train/configs/ fills these dataclasses.

Every field is declared here, so an override of an unknown key (a typo) is an error, and every value is
type-checked by OmegaConf when the config is composed. Cross-field rules live in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from bigscience_train.model.shape import GPTShape


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class DecayStyle(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


# Names a YAML value can spell ("1f1b" is no identifier, so this one is a checked string, not an Enum).
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


class DataParallelShard(str, Enum):
    none = "none"
    zero1 = "zero1"
    zero2 = "zero2"
    zero3 = "zero3"


class Engine(str, Enum):
    native = "native"
    deepspeed = "deepspeed"


class Offload(str, Enum):
    none = "none"
    optimizer = "optimizer"
    params = "params"


class Recompute(str, Enum):
    none = "none"
    selective = "selective"
    full = "full"


@dataclass
class ModelConfig(GPTShape):
    """The architecture (every field of the model's GPTShape), a preset name, and the vocabulary padding: the
    embedding is padded to a multiple of make_vocab_size_divisible_by * tp, as Megatron does, so each TP rank
    holds an equal slice."""

    name: str = MISSING
    make_vocab_size_divisible_by: int = 128

    @classmethod
    def unset(cls) -> ModelConfig:
        """The section before a preset fills it: the shape's required fields missing."""
        return cls(num_layers=MISSING, hidden_size=MISSING, num_heads=MISSING, seq_length=MISSING)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # null: inferred as world_size / (tp * pp).
    dp: int | None = None
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    # Count the embedding and the output layer as one transformer layer each when balancing stages
    # (BigScience's partition method type:transformer|embedding): (layers + 2) % (pp * virtual_stages) == 0.
    pp_count_embeddings: bool = False
    # none: replicas; zero1: optimizer states and fp32 masters sharded over dp (BigScience's layout); zero2:
    # gradients too; zero3: parameters too (parallel/data.py).
    dp_shard: DataParallelShard = DataParallelShard.none
    # native: this package's layouts; deepspeed: DeepSpeed's engine for data parallelism alone (tp = pp = 1), its
    # ZeRO stage from dp_shard (parallel/deepspeed_engine.py).
    engine: Engine = Engine.native
    # engine=deepspeed: the optimizer states and fp32 masters (optimizer) or also the parameters (params, zero3)
    # kept in CPU memory.
    offload: Offload = Offload.none
    # engine=deepspeed with zero3: parameters of fewer elements stay whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold: fewer latency-bound gathers for biases and layernorms).
    zero3_persistence_threshold: int = 100_000
    # The dtype gradients are averaged over dp in; with bf16 or fp16 training, FSDP also gathers parameters
    # in the training dtype.
    reduce_dtype: Dtype = Dtype.fp32
    recompute: Recompute = Recompute.none
    # A collective that has not completed after this long fails the job (the process group's timeout).
    timeout_minutes: float = 30.0


@dataclass
class PrecisionConfig:
    dtype: Dtype = Dtype.fp32
    # fp16 dynamic loss scaling, the values BigScience used on Jean Zay.
    initial_scale_power: int = 12
    loss_scale_window: int = 500
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    # Stop after this many consecutive gradient overflows at min_loss_scale: no smaller scale can cure them.
    min_scale_patience: int = 5


@dataclass
class ValidSetConfig:
    """A named validation set (BLOOM logged one validation loss per language, Megatron-DeepSpeed's
    --valid-weighted-split-paths): its loss is logged as val_loss/<name>."""

    name: str = MISSING
    # Its datasets, in data.blend's syntax: [prefix] or [weight, prefix, weight, prefix, ...].
    prefix: list[str] = MISSING
    # Its share of the aggregate val_loss, the weighted mean over the sets.
    weight: float = 1.0
    # The set reads the valid split of its prefixes under this split (null: data.split), so a set drawn from
    # the training datasets reads only the documents training leaves out; '0,1,0' reads a dataset whole.
    split: str | None = None


@dataclass
class DataConfig:
    # Named validation sets, each logged on its own; empty: the valid split of data.blend, as val_loss.
    valid: list[ValidSetConfig] = field(default_factory=list)
    # Megatron-style blend: [weight, prefix, weight, prefix, ...] or [prefix].
    blend: list[str] = field(default_factory=list)
    split: str = "949,50,1"
    # A Hugging Face tokenizer.json, or (with tokenizer=null) GPT-2's vocab.json and merges.txt as Megatron's
    # --vocab-file and --merge-file give them.
    tokenizer: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    seed: int = 1234
    cache_dir: str | None = None
    # Megatron's --eod-mask-loss: no loss on the predictions made at EOD tokens.
    eod_mask_loss: bool = False
    # Megatron's --reset-position-ids: positions restart after each EOD (learned and rotary positions; ALiBi's
    # bias is relative, and unchanged).
    reset_position_ids: bool = False
    # Megatron's --reset-attention-mask: tokens attend only within their own document of the sample.
    reset_attention_mask: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    decay_style: DecayStyle = DecayStyle.cosine
    warmup_samples: int = 0
    # Decay length: by samples, or by tokens as BigScience did (--lr-decay-tokens). Exactly one is set.
    decay_samples: int | None = None
    decay_tokens: int | None = None


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # Megatron's --rampup-batch-size: [start, increment, ramp samples]; empty for no ramp-up.
    rampup_batch_size: list[int] = field(default_factory=list)
    # The run ends at whichever of iters / tokens comes first; at least one is set.
    iters: int | None = None
    tokens: int | None = None
    eval_interval: int = 100
    eval_iters: int = 10
    # Zero-shot tasks (bundled, or lm-eval's with cached data) scored every eval_tasks_interval steps, as
    # BigScience did every 1k iterations: logged as metrics and written to RUN/eval/step_N/ like `bigscience
    # eval` results. Needs the [eval] extra.
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_interval: int = 1000
    # Documents per task (null: all).
    eval_tasks_limit: int | None = None
    exit_duration_minutes: float | None = None
    # Megatron's --exit-interval: save and exit after a step divisible by this (the run resumes later).
    exit_interval: int | None = None
    seed: int = 1234
    # torch.compile each transformer block (fuses the elementwise work between matmuls; the first steps
    # pay the compilation).
    compile: bool = False
    # The output layer and cross-entropy in one pass over chunks of tokens (model/output_loss.py): whole logits
    # never exist. Not with tensor parallelism (its vocab-parallel loss) or a pipeline (its last stage's loss
    # takes logits), which take the unfused path.
    fused_output_loss: bool = True
    # auto: continue from RUN/checkpoints/latest when there is one; never: always start fresh.
    resume: str = "auto"
    # A run with no checkpoint of its own starts from this one (a run directory, checkpoints/ or step
    # directory of any layout, or a `ckpt import-hf` output)...
    load: str | None = None
    # ...its weights only, with a fresh optimizer at step 0 (fine-tuning), rather than its whole state.
    finetune: bool = False
    # Stop with an error after this many consecutive non-finite losses (each such step is skipped; in fp32 and
    # bf16 non-finite gradients too: fp16 overflows are the loss scaler's, see precision.min_scale_patience).
    max_consecutive_nonfinite: int = 5
    # The signal that asks for a checkpoint and a clean exit at the next step boundary (Slurm sends it
    # before the wall-clock limit: --signal); the next job of a chain resumes from it.
    stop_signal: str = "SIGUSR1"
    # A file whose existence stops the run cleanly (checkpoint, exit) and ends a Slurm chain; null: none.
    kill_switch: str | None = "${run_dir}/kill-switch"
    # No step finished for this long: every rank writes its stacks to RUN/hangs/<job>/ and the job exits, so
    # that a chain's next job resumes (train/watchdog.py). Armed after the job's first step; checkpoint saves
    # and validation count as time between steps. Less than parallel.timeout_minutes; null: no watchdog.
    hang_timeout_minutes: float | None = 20.0
    # Megatron-DeepSpeed's --skip-train-iteration-range: [[first, last], ...] iterations (1-based, inclusive) whose
    # batches are skipped without a forward, backward or optimizer step, as BigScience did past loss spikes.
    skip_iterations: list[list[int]] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    interval: int = 1000
    save_final: bool = True
    # Retention, applied only after a new checkpoint is committed: the newest keep_last (null: all) and
    # every step divisible by keep_every (milestones) stay.
    keep_last: int | None = None
    keep_every: int | None = None
    # Write shards in the background while training continues (`async` is a Python keyword); the step that
    # starts the next save, or the end of the run, waits for it and commits it.
    async_save: bool = False
    # Threads (one file each) that write each rank's shards through DCP's FileSystemWriter: a second one
    # serializes while the first waits on the disk.
    write_threads: int = 2


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    # Weights & Biases: offline by default (compute nodes have no internet; `wandb sync RUN/wandb/offline-*`
    # later), online when asked.
    wandb: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "bigscience"
    # auto: a progress bar on a terminal, plain lines otherwise.
    progress: str = "auto"
    # codecarbon's offline tracker on each node's local rank 0, CSVs in RUN/carbon/ (needs the [carbon] extra).
    carbon: bool = True
    carbon_interval_s: float = 15.0
    # A training loss above spike_factor x the median of the last spike_window steps is logged as a spike
    # (a line, and a "spike" record in metrics.jsonl); null: no detection.
    spike_factor: float | None = 1.5
    spike_window: int = 100
    # A rank whose mean busy time per step (step time less communication wait) over a log interval is this
    # many percent above the median of all ranks is named (rank, node) as a straggler.
    straggler_pct: float = 20.0


class Launcher(str, Enum):
    # One Slurm task per node running torchrun (c10d rendezvous), or one Slurm task per rank.
    torchrun = "torchrun"
    srun = "srun"


@dataclass
class ClusterConfig:
    """Where a run executes: the machine, and for Slurm clusters the sbatch directives of a job."""

    name: str = "local"
    # Key into the device tables (peak FLOP/s, memory, power); cpu: the matmul peak measured at start-up.
    device: str = "cpu"
    # Overrides of the device table, for variants (V100 16 GB) and sites (a capped TDP).
    device_memory_gb: float | None = None
    tdp_watts: float | None = None
    # Network injection bandwidth of one node, GB/s (e.g. 4 x 100 Gb/s links = 50).
    inter_node_gbps: float = 25.0
    # Power usage effectiveness of the data centre and grid carbon intensity (g CO2eq/kWh), for estimates.
    pue: float = 1.0
    carbon_intensity: float | None = None
    country_iso_code: str | None = None
    nodes: int = 1
    # Training processes (ranks) per node: one per GPU.
    procs_per_node: int = 1
    # In-job restarts (torchrun --max-restarts): a crashed rank restarts every rank of the job, which resumes
    # from `latest` without waiting in the queue again. A run that stopped as failed is not retried.
    max_restarts: int = 0
    cpus_per_node: int | None = None
    # Generic resources per node, e.g. gpu:4.
    gres: str | None = None
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    # nomultithread: physical cores only.
    hint: str | None = None
    # Wall-clock limit of one job, [D-]HH:MM:SS or minutes.
    time: str = "01:00:00"
    exclude: str | None = None
    # Any further directives, written as given: ["--mail-type=FAIL", "--mem=0"].
    extra_directives: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    # Shell lines run before training, written verbatim (they are code: no secrets here).
    setup: list[str] = field(default_factory=list)
    # Environment variables exported by the job; values are shell-quoted.
    env: dict[str, str] = field(default_factory=dict)
    # Compute nodes without internet: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE, WANDB_MODE.
    offline: bool = True
    launcher: Launcher = Launcher.torchrun
    # Each node's devices, a matmul and an all-reduce across nodes checked before the model is built
    # (parallel/health.py); a failing node is written to RUN/slurm/excluded_nodes, which later jobs exclude.
    health_check: bool = True
    # The health check's all-reduce must complete within this (the job's first collective on NCCL).
    health_timeout_seconds: float = 120.0
    # train.stop_signal is sent this many seconds before the time limit (enough to save a checkpoint).
    signal_seconds: int = 300
    # Jobs in a chain across wall-clock limits (an array run one at a time, each resuming from `latest`).
    chain_jobs: int = 1
    # The Python (with bigscience_train installed) and the directory jobs run in; null: this one, here.
    python: str | None = None
    workdir: str | None = None


@dataclass
class EvalConfig:
    """`bigscience eval`: what to evaluate (one of checkpoint, hf, run) and how."""

    # One checkpoint: a step directory, or the latest of a checkpoints/ or run directory.
    checkpoint: str | None = None
    # A Hugging Face BLOOM-style directory (safetensors), imported first.
    hf: str | None = None
    # Every committed checkpoint of a run directory, skipping those already evaluated on all the tasks.
    run: str | None = None
    # Bundled tasks (evaluation/tasks/*.yaml) or lm-eval task names whose data is in the local HF cache.
    tasks: list[str] = field(default_factory=lambda: ["stdlib_cloze", "stdlib_choice"])
    num_fewshot: int = 0
    # Documents per task (null: all).
    limit: int | None = None
    # Scoring batches: rows x longest row, in tokens; and at most batch_size rows (null: no cap).
    batch_tokens: int = 8192
    batch_size: int | None = None
    max_gen_tokens: int = 64
    # Where results go (null: the run's eval/ folder; for hf, runs/eval/<directory name>/eval).
    output: str | None = None
    # Where hf= is imported, once, and reused by later evaluations: a directory every node sees (null:
    # <directory name>-import beside the output).
    import_dir: str | None = None


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/${name}"
    model: ModelConfig = field(default_factory=ModelConfig.unset)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
