"""`bigscience config from-megds`: Megatron-DeepSpeed launches to our overrides.

The two runs are BigScience's own (bigscience-workshop/bigscience, train/): tr1-13B-base/tr1-13B-round1.slurm
and tr11-176B-ml/tr11-176B-ml.slurm as it stood during BLOOM's training (48 nodes; it moved to 24 in July
2022). Their argument values, #SBATCH directives and DeepSpeed settings are written here as facts; the
scripts around them are laid out anew, in the shell styles those scripts use (variables, quoted argument
groups, a here-document or a JSON file, `srun ... bash -c`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bigscience_train.cli import main
from bigscience_train.config import load_config
from bigscience_train.config.from_megds import check, convert
from bigscience_train.config.megds_launch import read_launch
from bigscience_train.config.megds_result import DEFAULT, IGNORED, NO_EQUIVALENT, UNKNOWN
from bigscience_train.config.megds_shell import ShellError, ShellReader

TR1_SBATCH = {
    "job-name": "tr1-13B",
    "constraint": "v100-32g",
    "nodes": "128",
    "ntasks-per-node": "1",
    "cpus-per-task": "40",
    "hint": "nomultithread",
    "gres": "gpu:4",
    "time": "20:00:00",
    "account": "six@v100",
}
TR1_VARIABLES = (
    "NNODES=128 GPUS_PER_NODE=4 TP_SIZE=2 PP_SIZE=4 MICRO_BATCH_SIZE=1 NLAYERS=40 NHIDDEN=5120 "
    "NHEADS=32 FFN_HIDDEN_SIZE=20480 SEQ_LEN=2048 SAVE_INTERVAL=1500 ZERO_STAGE=1 "
)
TR11_SBATCH = {
    "job-name": "tr11-176B-ml",
    "partition": "gpu_p5",
    "constraint": "a100",
    "reservation": "hug",
    "qos": "qos_gpu-gc",
    "nodes": "48",
    "ntasks-per-node": "1",
    "cpus-per-task": "64",
    "hint": "nomultithread",
    "gres": "gpu:8",
    "time": "100:00:00",
    "account": "six@a100",
}
TR11_VARIABLES = (
    "GPUS_PER_NODE=8 TP_SIZE=4 PP_SIZE=12 MICRO_BATCH_SIZE=2 GLOBAL_BATCH_SIZE=2048 NHIDDEN=14336 "
    "NLAYERS=70 NHEADS=112 SEQ_LEN=2048 SAVE_INTERVAL=100 TRAIN_SAMPLES=220_000_000 "
    "LR_DECAY_SAMPLES=200_000_000 LR_WARMUP_SAMPLES=183_105 "
    "TOKENIZER=bigscience-catalogue-data-dev/byte-level-bpe-tokenizer-no-norm-250k-whitespace-and-eos-regex-alpha-v3-dedup-lines-articles "
)


def ds_config(micro_batch: int, global_batch: int, stage: int, precision: dict) -> dict:
    """The DeepSpeed config both runs wrote, with their batch sizes, ZeRO stage and precision section."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": global_batch,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        **precision,
        "steps_per_print": 2000,
        "wall_clock_breakdown": False,
    }


TR1_FP16 = {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1}
TR1_DS = ds_config(1, 1024, 1, {"fp16": TR1_FP16 | {"initial_scale_power": 12}})
TR11_DS = ds_config(2, 2048, 0, {"bf16": {"enabled": True}})


def sbatch_lines(directives: dict[str, str]) -> str:
    return "".join(f"#SBATCH --{k}={v}   # {k}\n" for k, v in directives.items())


def assignments(variables: str) -> str:
    """The variables a script sets, one assignment a line."""
    return "".join(f"{word}\n" for word in variables.split())


def group(name: str, lines: list[str], tail: str = "") -> str:
    """A quoted argument group as BigScience's scripts write them: one argument per continued line, and
    `tail` lines inside the quotes without continuations."""
    return f'{name}=" \\\n' + "".join(f"    {line} \\\n" for line in lines) + tail + '    "\n'


def optimizer_group(name: str, beta2: str, lr: str, min_lr: str, decay: str, warmup: str) -> str:
    """The optimizer arguments, one list in both runs: Adam (0.9, beta2, 1e-8), cosine decay by samples,
    clipping 1.0, weight decay 0.1."""
    fixed = ["--optimizer adam", "--adam-beta1 0.9", "--adam-eps 1e-8", "--lr-decay-style cosine"]
    given = [f"--adam-beta2 {beta2}", f"--lr {lr}", f"--min-lr {min_lr}", f"--lr-decay-samples {decay}"]
    return group(
        name, fixed + given + [f"--lr-warmup-samples {warmup}", "--clip-grad 1.0", "--weight-decay 1e-1"]
    )


def heredoc_json(config: dict, variables: dict[str, str]) -> str:
    """The config as a here-document body in which the values of these keys are shell variables."""
    text = json.dumps(config, indent=2)
    for key, variable in variables.items():
        text = re.sub(rf'("{key}": )[^,\n]+', rf"\g<1>${variable}", text)
    return text


def tr1_13b(tmp_path):
    out = "$six_ALL_CCFRSCRATCH/checkpoints/tr1-13B"
    repo = "$six_ALL_CCFRWORK/code/tr1-13B/Megatron-DeepSpeed-tr1-13B"
    text = "#!/bin/bash\n" + sbatch_lines(TR1_SBATCH) + "set -x -e\n" + assignments(TR1_VARIABLES)
    text += "GLOBAL_BATCH_SIZE=$(( MICRO_BATCH_SIZE * 1024 ))\n"
    text += f"OUT={out}\nMEGATRON_REPO={repo}\n"
    text += optimizer_group("OPTIMIZER", "0.999", "1e-4", "1e-5", "126_953_125", "216_320")
    # The model group ends one line without a backslash, inside the quotes, as tr1-13B's GPT_ARGS did.
    text += group(
        "MODEL",
        ["--num-layers $NLAYERS", "--hidden-size ${NHIDDEN}", "--ffn-hidden-size $FFN_HIDDEN_SIZE"]
        + ["--num-attention-heads $NHEADS", "--seq-length $SEQ_LEN", "--max-position-embeddings $SEQ_LEN"]
        + ["--micro-batch-size $MICRO_BATCH_SIZE", "--rampup-batch-size 16 16 5_000_000"]
        + ["--global-batch-size $GLOBAL_BATCH_SIZE", "--train-samples 300_000_000"]
        + [
            "--vocab-file $MEGATRON_REPO/data/gpt2-vocab.json",
            "--merge-file $MEGATRON_REPO/data/gpt2-merges.txt",
        ]
        + ["--loss-scale 12", "--clip-grad 1.0", "--fp16", "--checkpoint-activations"],
        tail="    --seed 42\n    $OPTIMIZER --exit-duration-in-mins 1190\n",
    )
    text += group(
        "OUTPUT",
        ["--log-interval 10", "--save-interval $SAVE_INTERVAL", "--eval-interval 1000", "--eval-iters 5"]
        + [
            "--codecarbon-dir $OUT/codecarbon",
            "--tensorboard-dir $OUT/tensorboard",
            "--tensorboard-queue-size 5",
        ]
        + [
            "--log-timers-to-tensorboard",
            "--log-batch-size-to-tensorboard",
            "--log-validation-ppl-to-tensorboard",
        ],
    )
    text += 'config_json="./ds_config.$SLURM_JOBID.json"\n'
    placed = {
        "train_micro_batch_size_per_gpu": "MICRO_BATCH_SIZE",
        "train_batch_size": "GLOBAL_BATCH_SIZE",
        "stage": "ZERO_STAGE",
    }
    text += "cat <<EOT > $config_json\n" + heredoc_json(TR1_DS, placed) + "\nEOT\n"
    text += group(
        "DEEPSPEED",
        ["--deepspeed", "--deepspeed_config ${config_json}", "--zero-stage ${ZERO_STAGE}"]
        + ["--deepspeed-activation-checkpointing"],
    )
    text += group(
        "export LAUNCHER",
        ["python -u -m torch.distributed.launch", "--nproc_per_node $GPUS_PER_NODE", "--nnodes $NNODES"]
        + ["--master_addr $MASTER_ADDR", "--master_port 6000"],
    )
    text += group(
        "export CMD",
        [
            "`pwd`/pretrain_gpt.py",
            "--tensor-model-parallel-size $TP_SIZE",
            "--pipeline-model-parallel-size $PP_SIZE",
        ]
        + ["$MODEL", "$OUTPUT", "--save $OUT/checkpoints", "--load $OUT/checkpoints"]
        + [
            "--data-path $six_ALL_CCFRWORK/datasets-custom/oscar-en/meg-gpt2_text_document",
            "--data-impl mmap",
        ]
        + ["--split 949,50,1", "--distributed-backend nccl", "$DEEPSPEED"],
    )
    text += "echo $CMD\n"
    text += (
        "srun --jobid $SLURM_JOBID bash -c '$LAUNCHER --node_rank $SLURM_PROCID $CMD' 2>&1 | tee -a log.txt\n"
    )
    path = tmp_path / "tr1-13B.slurm"
    path.write_text(text)
    return path


def tr11_176b(tmp_path):
    out = "$six_ALL_CCFRSCRATCH/checkpoints/tr11-176B-ml"
    text = "#!/bin/bash\n" + sbatch_lines(TR11_SBATCH) + "set -x -e\n" + assignments(TR11_VARIABLES)
    text += f"OUT={out}\nKILL_SWITCH_PATH=$OUT/kill-switch-tr11-176B-exp1\n"
    text += "DP_SIZE=$((SLURM_NNODES*GPUS_PER_NODE/(PP_SIZE*TP_SIZE)))  # unknown here: stays as written\n"
    text += optimizer_group(
        "OPTIMIZER_ARGS", "0.95", "6e-5", "6e-6", "$LR_DECAY_SAMPLES", "$LR_WARMUP_SAMPLES"
    )
    text += group(
        "GPT_ARGS",
        [
            "--pp-partition-method 'type:transformer|embedding'",
            "--num-layers $NLAYERS",
            "--hidden-size $NHIDDEN",
        ]
        + ["--num-attention-heads $NHEADS", "--seq-length $SEQ_LEN", "--max-position-embeddings $SEQ_LEN"]
        + ["--micro-batch-size $MICRO_BATCH_SIZE", "--rampup-batch-size 192 16 9_765_625"]
        + [
            "--global-batch-size $GLOBAL_BATCH_SIZE",
            "--train-samples $TRAIN_SAMPLES",
            "--tokenizer-type PretrainedFromHF",
        ]
        + ["--tokenizer-name-or-path $TOKENIZER", "--init-method-std 0.0048", "--embed-layernorm", "--bf16"]
        + ["--seed 42", "--position-embedding-type alibi", "--checkpoint-activations"]
        + ["--abort-on-unmet-fused-kernel-constraints", "--kill-switch-path $KILL_SWITCH_PATH"]
        + ["--pad-vocab-size-to 250880", "$OPTIMIZER_ARGS", "--exit-duration-in-mins 5990"],
    )
    text += group(
        "OUTPUT_ARGS",
        ["--log-interval 1", "--save-interval $SAVE_INTERVAL", "--eval-interval 1000", "--eval-iters 1"]
        + ["--tensorboard-dir $OUT/tensorboard", "--tensorboard-queue-size 5", "--log-timers-to-tensorboard"]
        + ["--log-batch-size-to-tensorboard", "--log-validation-ppl-to-tensorboard"],
    )
    text += group(
        "DEEPSPEED_ARGS",
        [
            "--deepspeed",
            "--deepspeed_config ds_config.json",
            "--zero-stage 0",
            "--deepspeed-activation-checkpointing",
        ],
    )
    text += group(
        "export LAUNCHER",
        ["python -u -m torch.distributed.run", "--nproc_per_node $GPUS_PER_NODE", "--nnodes $SLURM_NNODES"]
        + ["--rdzv_endpoint $MASTER_ADDR:6000", "--rdzv_backend c10d", "--max_restarts 0", "--tee 3"],
    )
    text += group(
        "export CMD",
        [
            "`pwd`/pretrain_gpt.py",
            "--tensor-model-parallel-size $TP_SIZE",
            "--pipeline-model-parallel-size $PP_SIZE",
        ]
        + ["$GPT_ARGS", "$OUTPUT_ARGS", "--save $OUT/checkpoints/main", "--load $OUT/checkpoints/main"]
        + ["--train-weighted-split-paths-path $OUT/train-splits.txt"]
        + [
            "--valid-weighted-split-paths-path $OUT/valid-splits.txt",
            "--num-workers 2",
            "--valid-num-workers 0",
        ]
        + ["--data-impl mmap", "--distributed-backend nccl", "$DEEPSPEED_ARGS"],
    )
    text += 'srun --wait=60 --kill-on-bad-exit=1 bash -c "$LAUNCHER --node_rank \\$SLURM_PROCID $CMD"\n'
    path = tmp_path / "tr11-176B-ml.slurm"
    path.write_text(text)
    (tmp_path / "ds_config.json").write_text(json.dumps(TR11_DS))
    return path


def unmapped(conversion) -> dict[str, str]:
    return {u.argument: u.kind for u in conversion.unmapped}


def override(conversion, key: str):
    return next(o for o in conversion.overrides if o.key == key)


def test_tr1_13b(tmp_path):
    conversion = convert(tr1_13b(tmp_path))
    keys = [o.key for o in conversion.overrides]
    assert len(keys) == len(set(keys)), "one override per key: their order then does not matter"
    cfg = load_config(conversion.lines)
    m, par, tr, opt, prec, c = cfg.model, cfg.parallel, cfg.train, cfg.optim, cfg.precision, cfg.cluster
    assert (m.num_layers, m.hidden_size, m.num_heads, m.seq_length) == (40, 5120, 32, 2048)
    assert (m.position.value, m.embedding_layernorm, m.vocab_size, m.hidden_dropout) == (
        "learned",
        False,
        50257,
        0.1,
    )
    assert (par.tp, par.pp, par.dp_shard.value, par.recompute.value) == (2, 4, "zero1", "full")
    assert (tr.micro_batch_size, tr.global_batch_size, list(tr.rampup_batch_size)) == (
        1,
        1024,
        [16, 16, 5_000_000],
    )
    # --train-samples 300M x 2048 tokens; Megatron's run ended at whichever came first, so does ours.
    assert tr.tokens == 300_000_000 * 2048 and tr.iters is None
    assert (tr.seed, cfg.data.seed, tr.eval_interval, tr.eval_iters, tr.exit_duration_minutes) == (
        42,
        42,
        1000,
        5,
        1190,
    )
    assert prec.dtype.value == "fp16"
    assert (prec.initial_scale_power, prec.loss_scale_window, prec.hysteresis, prec.min_loss_scale) == (
        12,
        500,
        2,
        1.0,
    )
    assert (opt.lr, opt.min_lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay) == (
        1e-4,
        1e-5,
        0.9,
        0.999,
        1e-8,
        0.1,
    )
    assert (opt.decay_style.value, opt.decay_samples, opt.warmup_samples, opt.clip_grad) == (
        "cosine",
        126_953_125,
        216_320,
        1.0,
    )
    assert list(cfg.data.blend) == ["$six_ALL_CCFRWORK/datasets-custom/oscar-en/meg-gpt2_text_document"]
    assert (cfg.data.split, cfg.checkpoint.interval, cfg.logging.log_interval) == ("949,50,1", 1500, 10)
    assert (c.name, c.nodes, c.procs_per_node, c.account, c.time) == (
        "jean_zay_v100_32g",
        128,
        4,
        "six@v100",
        "20:00:00",
    )
    assert override(conversion, "train.tokens").how == (
        "--train-samples 300_000_000 x --seq-length 2048 = 614_400_000_000 tokens"
    )
    assert override(conversion, "model.hidden_dropout").source == DEFAULT
    assert conversion.ds_config_source.startswith("the here-document at line")
    kinds = unmapped(conversion)
    assert "--vocab-file" not in kinds and "--merge-file" not in kinds
    # GPT2BPETokenizer's files (Megatron's default tokenizer) are read as they are.
    repo = "$six_ALL_CCFRWORK/code/tr1-13B/Megatron-DeepSpeed-tr1-13B"
    assert cfg.data.tokenizer is None and (cfg.data.vocab_file, cfg.data.merge_file) == (
        f"{repo}/data/gpt2-vocab.json",
        f"{repo}/data/gpt2-merges.txt",
    )
    assert kinds["--loss-scale"] == kinds["--deepspeed-activation-checkpointing"] == IGNORED
    assert (
        kinds["--distributed-backend"]
        == kinds["--tensorboard-queue-size"]
        == kinds["steps_per_print"]
        == IGNORED
    )
    assert kinds["--master_addr"] == kinds["--job-name"] == IGNORED
    assert (
        "--num-layers" not in kinds and "--ffn-hidden-size" not in kinds
    )  # 20480 = 4 x 5120: nothing to set
    world, problems = check(conversion)
    # BigScience ran tr1-13B's ramp-up on 16 nodes (its README): at 128 nodes, dp=64 does not divide 16.
    assert world == 512
    assert problems == [
        "train.rampup_batch_size start=16 is not divisible by micro batch x dp=64",
        "train.rampup_batch_size increment=16 is not divisible by micro batch x dp=64",
    ]


def test_tr11_176b(tmp_path):
    # The valid-splits.txt BigScience's data/catalogue/load_ratios_meg_ds_format.py writes: the blend's last 5%,
    # then each language's alone; beside the script here (its path on Jean Zay is not this machine's).
    data = "$six_ALL_CCFRWORK/bigscience-training/merged-meg-ds_v3_pii"
    ar, en = f"{data}/ar/meg_text_document", f"{data}/en/meg_text_document"
    (tmp_path / "valid-splits.txt").write_text(
        f'"valid: 0.3 0.950:1.0 {ar}, 0.7 0.950:1.0 {en}" "valid_ar: 1 0.950:1.0 {ar}" "valid_en: 1 0.950:1.0 {en}"\n'
    )
    conversion = convert(tr11_176b(tmp_path))
    cfg = load_config(conversion.lines)
    m, par, tr, opt, c = cfg.model, cfg.parallel, cfg.train, cfg.optim, cfg.cluster
    assert (m.num_layers, m.hidden_size, m.num_heads, m.seq_length, m.vocab_size) == (
        70,
        14336,
        112,
        2048,
        250880,
    )
    assert (m.position.value, m.embedding_layernorm, m.init_std) == ("alibi", True, 0.0048)
    # Not in the script: tr11's README says the Megatron-LM dropout defaults (0.1, 0.1) were inherited.
    assert (m.hidden_dropout, m.attention_dropout) == (0.1, 0.1)
    assert (par.tp, par.pp, par.pp_count_embeddings, par.recompute.value) == (4, 12, True, "full")
    assert (tr.micro_batch_size, tr.global_batch_size, list(tr.rampup_batch_size)) == (
        2,
        2048,
        [192, 16, 9_765_625],
    )
    assert tr.tokens == 220_000_000 * 2048
    assert cfg.precision.dtype.value == "bf16"
    # ZeRO stage 0 in the DeepSpeed config; with bf16 that is BF16_Optimizer, whose sharding is ZeRO-1's.
    dp_shard = override(conversion, "parallel.dp_shard")
    assert dp_shard.source == "DeepSpeed zero_optimization.stage" and "stage 0" in dp_shard.how
    assert par.dp_shard.value == "zero1"
    assert (opt.lr, opt.min_lr, opt.beta2, opt.decay_samples, opt.warmup_samples) == (
        6e-5,
        6e-6,
        0.95,
        200_000_000,
        183_105,
    )
    assert (cfg.checkpoint.interval, cfg.logging.log_interval, tr.eval_iters, tr.exit_duration_minutes) == (
        100,
        1,
        1,
        5990,
    )
    assert tr.kill_switch == "$six_ALL_CCFRSCRATCH/checkpoints/tr11-176B-ml/kill-switch-tr11-176B-exp1"
    assert (c.name, c.nodes, c.procs_per_node, c.reservation, c.account, c.qos) == (
        "jean_zay_a100",
        48,
        8,
        "hug",
        "six@a100",
        "qos_gpu-gc",
    )
    assert conversion.ds_config_source == str(tmp_path / "ds_config.json")
    kinds = unmapped(conversion)
    for name in ("--tokenizer-name-or-path", "--train-weighted-split-paths-path"):
        assert kinds[name] == NO_EQUIVALENT
    # BLOOM's per-language validation: one named set per group, each over the datasets' last 5%.
    assert [(v.name, list(v.prefix), v.split) for v in cfg.data.valid] == [
        ("valid", ["0.3", ar, "0.7", en], "0.95,0.05,0"),
        ("valid_ar", [ar], "0.95,0.05,0"),
        ("valid_en", [en], "0.95,0.05,0"),
    ]
    assert kinds["--num-workers"] == kinds["--valid-num-workers"] == NO_EQUIVALENT
    assert kinds["--abort-on-unmet-fused-kernel-constraints"] == IGNORED
    assert kinds["--rdzv_backend"] == kinds["--nnodes"] == IGNORED  # the launcher's; #SBATCH gives the size
    assert "--pp-partition-method" not in kinds and "--pad-vocab-size-to" not in kinds
    # BLOOM's layout passes every rule of ours at 48 x 8 GPUs, the ramp-up included.
    assert check(conversion) == (384, [])


@pytest.mark.parametrize(
    "stage, dtype, expected",
    [(0, "fp16", "none"), (0, "bf16", "zero1"), (2, "fp16", "zero2"), (3, "bf16", "zero3")],
)
def test_zero_stage(tmp_path, stage, dtype, expected):
    (tmp_path / "ds.json").write_text(
        json.dumps({"zero_optimization": {"stage": stage}, dtype: {"enabled": True}})
    )
    path = tmp_path / "args.txt"
    path.write_text(
        f"--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --{dtype}\n--deepspeed --deepspeed-config ds.json\n"
    )
    conversion = convert(path)
    assert load_config(conversion.lines).parallel.dp_shard.value == expected


def test_argument_list_by_iterations(tmp_path):
    path = tmp_path / "args.txt"
    path.write_text(
        "# a plain argument list: no script, no DeepSpeed\n"
        "--num-layers 24 --hidden-size 1024 \\\n"
        "  --num-attention-heads 16 --seq-length 1024 --max-position-embeddings 2048\n"
        "--micro-batch-size 4 --global-batch-size 32 --train-iters 1000\n"
        "--lr 3e-4 --lr-warmup-iters 10 --lr-decay-iters 800 --lr-decay-samples 5\n"
        '--fp16 --loss-scale 8 --hysteresis 4 --kill-switch-path "/runs/it\'s here/stop"\n'
        "--num-layerz 3 --glu-activation geglu\n"
        "--eod-mask-loss --reset-attention-mask\n"
    )
    conversion = convert(path)
    cfg = load_config(conversion.lines)
    assert (cfg.train.iters, cfg.optim.warmup_samples, cfg.optim.decay_samples) == (1000, 320, 25_600)
    assert (
        override(conversion, "optim.warmup_samples").how
        == "--lr-warmup-iters 10 x --global-batch-size 32 = 320 samples"
    )
    # What the launch left to Megatron's defaults, where ours differ.
    assert (cfg.optim.decay_style.value, cfg.optim.weight_decay, cfg.optim.min_lr) == ("linear", 0.01, 0.0)
    assert (cfg.model.position.value, cfg.model.attention_dropout, cfg.train.eval_iters) == (
        "learned",
        0.1,
        100,
    )
    # Megatron's own fp16 scaling (no DeepSpeed): 2^32 at first, its --hysteresis.
    assert (cfg.precision.dtype.value, cfg.precision.initial_scale_power, cfg.precision.hysteresis) == (
        "fp16",
        32,
        4,
    )
    assert cfg.train.kill_switch == "/runs/it's here/stop"
    assert (cfg.data.eod_mask_loss, cfg.data.reset_position_ids, cfg.data.reset_attention_mask) == (
        True,
        False,
        True,
    )
    assert cfg.cluster.name == "local" and conversion.cluster_preset is None
    kinds = unmapped(conversion)
    assert kinds["--num-layerz"] == UNKNOWN
    assert (
        kinds["--glu-activation"]
        == kinds["--loss-scale"]
        == kinds["--max-position-embeddings"]
        == NO_EQUIVALENT
    )
    assert kinds["--lr-decay-samples"] == IGNORED  # Megatron reads it only with --train-samples


def test_shell_reading():
    text = (
        "A=3 B=${UNSET:-4}\nC=$(( (A + B) * 2 / 3 ))  # bash truncates\nexport D=\"x $A\"'$B'\n"
        "cat <<'END' > out.json\n$A stays\nEND\nrun $D \"$D\" ${E}\n"
    )
    reader = ShellReader(text, Path("test.sh"), {}).run()
    assert (reader.vars["B"], reader.vars["C"], reader.vars["D"]) == ("4", "4", "x 3$B")
    assert reader.heredocs["out.json"].body == "$A stays\n"
    assert reader.commands[-1].fields == ["run", "x", "3$B", "x 3$B", "${E}"]
    assert reader.unresolved == {"E"}
    with pytest.raises(ShellError, match=r"test.sh:2: a double quote is never closed"):
        ShellReader('X=1\nY="open\n', Path("test.sh"), {}).run()


def test_cli(tmp_path, capsys):
    path = tr1_13b(tmp_path)
    assert main(["config", "from-megds", str(path)]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert sorted(lines) == sorted(convert(path).lines)
    assert load_config(lines).cluster.nodes == 128
    assert (
        "# not mapped (" in text
        and "data.vocab_file=" in text
        and "# config check at 512 ranks: 2 problems" in text
    )
    assert main(["config", "from-megds", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cluster_preset"] == "jean_zay_v100_32g" and report["check"]["world_size"] == 512
    assert {
        "override": "parallel.tp=2",
        "key": "parallel.tp",
        "value": 2,
        "source": "--tensor-model-parallel-size",
        "how": None,
    } in report["overrides"]
    assert any(o["key"] == "data.merge_file" and o["source"] == "--merge-file" for o in report["overrides"])


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "--num-layers $NLAYERS\n",
            r"bad.sh:1: --num-layers takes an integer, got '\$NLAYERS' \(a shell variable",
        ),
        ("#!/bin/bash\necho hello\n", r"bad.sh: no Megatron-DeepSpeed launch found"),
        ("A=1\nARGS='--lr 1\n", r"bad.sh:2: a single quote is never closed"),
        (
            'cat <<EOT > ds.json\n{\n  "a": 1,\n}\nEOT\npython pretrain_gpt.py --deepspeed --deepspeed_config ds.json\n',
            r"bad.sh:4: the DeepSpeed config is not JSON",
        ),
        ("cat <<EOT > ds.json\n{}\n", r"bad.sh:1: here-document <<EOT never ends"),
        (
            'cat <<EOT > ds.json\n{"zero_optimization": {"stage": "auto"}}\nEOT\npretrain_gpt.py --deepspeed --deepspeed_config ds.json\n',
            r"bad.sh: the DeepSpeed config \(the here-document at line 1\) has zero_optimization.stage='auto', not an integer",
        ),
    ],
)
def test_bad_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.sh"
    path.write_text(text)
    assert main(["config", "from-megds", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err


def test_missing_file(tmp_path, capsys):
    assert main(["config", "from-megds", str(tmp_path / "none.slurm")]) == 2
    assert f"no such launch file {tmp_path / 'none.slurm'}" in capsys.readouterr().err


def test_launch_reading_names_lines(tmp_path):
    path = tr11_176b(tmp_path)
    launch = read_launch(path)
    lines = path.read_text().splitlines()
    layers = next(a for a in launch.args if a.name == "--num-layers")
    assert "--num-layers $NLAYERS" in lines[layers.line - 1]
    assert next(a for a in launch.args if a.name == "--pp-partition-method").values == [
        "type:transformer|embedding"
    ]
    assert [d.name for d in launch.sbatch][:3] == ["job-name", "partition", "constraint"]
