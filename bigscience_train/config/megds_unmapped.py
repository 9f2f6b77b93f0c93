"""Megatron-DeepSpeed arguments that set nothing here, each with its kind (no equivalent, or ignored on
purpose) and the reason `bigscience config from-megds` gives for it."""

from bigscience_train.config.megds_result import IGNORED, NO_EQUIVALENT

DS_ENGINE = "DeepSpeed engine tuning; ours has no DeepSpeed engine"
KINDS = {"none": NO_EQUIVALENT, "ignored": IGNORED}
# kind | reason | arguments; a table, so each reason is written once beside all the arguments it covers.
TABLE = f"""
none | our MLP is GeLU over 4 x hidden_size | --glu-activation
none | our blocks are pre-LN | --apply-residual-connection-post-layernorm
none | the residual stream is in the training dtype | --fp32-residual-connection
none | the attention kernel decides its softmax precision | --attention-softmax-in-fp32
none | weights are drawn from N(0, model.init_std) | --init-method-xavier-uniform
none | the loss is computed in fp32 | --fp16-lm-cross-entropy
none | no sentinel tokens (T5) | --vocab-extra-ids
none | ours splits one blend (data.blend) by data.split | --train-weighted-split-paths \
    --test-weighted-split-paths --train-weighted-split-paths-path --test-weighted-split-paths-path
none | our data loader has no worker count | --num-workers --valid-num-workers
none | the loss counts every token alike | --loss-on-targets-only --reweight-loss-based-on-position-frequency
none | data.tokenizer takes a tokenizer.json file (no hub at run time): save this tokenizer's and set \
data.tokenizer | --tokenizer-name-or-path
none | the optimizer is torch's AdamW | --use-bnb-optimizer --cpu-optimizer --cpu-torch-adam
none | the rate is always computed from this config | --use-checkpoint-lr-scheduler
none | evaluate with `bigscience eval` | --eval-only --inference
none | checkpoints always hold the whole training state | --no-save-optim --no-save-rng --no-load-rng
none | for weights only, use train.load with train.finetune=true | --no-load-optim
none | DeepSpeed activation-checkpointing option; ours is parallel.recompute | \
    --distribute-checkpointed-activations --partition-activations --contigious-checkpointing \
    --checkpoint-in-cpu --synchronize-each-layer --profile-backward
ignored | chosen by the device: NCCL on GPUs, gloo on CPUs | --distributed-backend
ignored | ranks come from the launcher's environment | --local-rank
ignored | ours reads the mmap .bin/.idx format | --data-impl
ignored | the dataset is memory-mapped and read on demand | --mmap-warmup
ignored | ours is Megatron's single-pass sampler, driven by consumed samples | --dataloader-type
ignored | our DCP checkpoints load at any layout | --universal-checkpoint
ignored | ours always computes the rate from this config | --override-lr-scheduler
ignored | DeepSpeed's implementation of --checkpoint-activations | --deepspeed-activation-checkpointing
ignored | ours averages TP-replicated gradients, so replicas cannot drift | --sync-tp-duplicated-parameters \
    --layernorm-tp-auto-sync
ignored | no Megatron fused CUDA kernels here (SDPA/FlexAttention and torch.compile) | \
    --abort-on-unmet-fused-kernel-constraints --no-masked-softmax-fusion --no-bias-gelu-fusion \
    --no-bias-dropout-fusion
ignored | ours is the same tanh GeLU | --openai-gelu
ignored | no ONNX export | --onnx-safe
ignored | an fp16 range guard that leaves the result unchanged | --no-query-key-layer-scaling
ignored | gradients are reduced by FSDP2 during backward | --use-contiguous-buffers-in-ddp
ignored | pipeline sends are torch.distributed.pipelining's | --no-scatter-gather-tensors-in-pipeline
ignored | the model is built on the meta device, then each rank's shards | --lazy-mpu-init \
    --use-cpu-initialization
ignored | ours stops on Slurm's signal (train.stop_signal) and chains jobs | --adlr-autoresume \
    --adlr-autoresume-interval
ignored | {DS_ENGINE} | --zero-reduce-scatter --zero-contigious-gradients --zero-reduce-bucket-size \
    --zero-allgather-bucket-size --remote-device --use-pin-memory --scattered-embeddings \
    --split-transformers --memory-centric-tiled-linear --tile-factor
ignored | TensorBoard is written by rank 0 as it goes | --tensorboard-queue-size --tensorboard-log-interval
ignored | ours logs it always (metrics.jsonl and TensorBoard) | --log-timers-to-tensorboard \
    --log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard \
    --no-log-learnig-rate-to-tensorboard --no-log-loss-scale-to-tensorboard
ignored | ours logs the gradient norm | --log-params-norm --log-num-zeros-in-grad
ignored | rank 0 prints; logs go to the run directory | --log-level --log-level-replica --log-path
"""
NOT_MAPPED = {
    name: (KINDS[kind.strip()], reason.strip())
    for kind, reason, names in (row.split(" | ") for row in TABLE.strip().splitlines())
    for name in names.split()
}
