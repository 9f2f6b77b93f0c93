"""Memory per device of this trainer, term by term, for the heaviest pipeline stage.

Notation: h hidden size, s sequence, b micro batch, a heads, V padded vocabulary, t tp, p pp, d dp, L layers,
m micro batches per step, P_r the parameters one rank holds, w the bytes of the training dtype (4 in fp32, 2
in bf16/fp16). The trainer keeps fp32 parameters whatever the precision, so per parameter: weights 4 B,
gradients 4 B, AdamW's two moments 8 B (parallel/data.py has the data-parallel modes).

- weights and optimizer states: 4 P_r and 8 P_r, divided by d when sharded (zero1 / zero2 / zero3).
- gradients: 4 P_r whole for replicas; sharded, 4 P_r / d, or, where a step accumulates whole ones before its
  one reduction (zero1 over several micro batches, any mode through a pipeline), those: r P_r in the reduce
  dtype (r = 4 B for fp32), where FSDP accumulates them, which the reduced shards replace unit by unit. With
  bf16/fp16 each backward first makes a unit's gradients in the training dtype, w P_unit B, which FSDP then
  adds into its accumulation; the root unit's (embedding, final layernorm, output layer) wait for the end of
  the stage's backward, so on the last stage the output layer's are alive through it: w (P_root + P_layer).
- gathered parameters (dp > 1, in the training dtype): zero1 and zero2 keep every unit gathered through the
  step: w P_r; zero3 two layers at a time: 2 w P_layer; replicas in bf16/fp16 compute from a w P_r copy.
- autocast weight cache (bf16/fp16 without data parallelism): each matmul weight cast once per step, 2 B per
  matmul parameter.
- activations, per layer and micro batch, with sbh = s*b*h elements (inputs saved for backward); below, fp32
  residuals are autocast's: with dp > 1 FSDP's mixed precision casts each unit's inputs, and the residual
  stream is in the training dtype (w B):
    none       fp32: 4(4 + 13/t) sbh B       bf16/fp16: (12 + 26/t) sbh B
    selective  fp32: 4(3 + 8/t) sbh B        bf16/fp16: (8 + 16/t) sbh B   (matmul outputs kept)
    full       the block input, 4 sbh B (w sbh B with dp > 1)
  The fp32 residual stream and layernorm inputs stay 4 B under autocast; matmul inputs and outputs are 2 B.
  Per micro batch also one more residual stream: the stage's output, which the pipeline keeps for its
  backward, or the final layernorm's input; and on the first stage the embedding layernorm's input.
- a block's backward: its incoming gradient and the MLP's 4h/t-wide one, (1 + 4/t) sbh in the activations'
  dtype; under full recompute also the block's `none` activations, recomputed.
- the ALiBi bias, (a/t) s^2 B x (2 or 4): one per model part on the rank (v with interleaved stages), shared by
  all layers and micro batches and kept from step to step.
- last stage: ln_f output 4 sbh B, logits and log-softmax 8 bsV/t B in fp32 (10 bsV/t B with autocast: bf16
  logits, then fp32), and the logits' gradient 4 bsV/t B. With the fused output loss instead
  (train.fused_output_loss, on the layouts ParallelDims.fused_output_loss allows): one chunk of c tokens'
  logits, 4 cV B (6 cV B with autocast), and the gradients it computes in forward, 4 sbh + 4 Vh B.
- micro batches in flight on stage k: 1 without pipeline, min(p - k, m) for 1F1B, m for GPipe,
  p + (p - 1)/v - k for interleaved 1F1B with v virtual stages (Narayanan et al. 2021).
- pipeline buffers: a received gradient, sbh in the residual stream's dtype, on every stage but the last
  (parallel/pipeline.py holds receive buffers only while their micro batch is in flight; received
  activations are the stage's input, counted in its activations).
- FSDP's buffers: a unit's all-gather output and the previous unit's, which FSDP keeps until the next copy-out,
  2 w P_unit (once a step under zero1/zero2, in the first forward; every forward and backward under zero3);
  and in the reduction after the last backward a unit's reduce-scatter input, r P_unit.
- the foreach AdamW step's one fp32 copy of the states it updates, 4 P_r (/d sharded).

What a step allocates and frees (`MemoryEstimate.transient`, what a dry run measures as activations) is
the largest of its phases: a backward with every micro batch in flight, through one block or, on the last
stage, through the output layer and loss; the last backward, one micro batch left, with one unit's reduction;
the first forward, gathering. The forward/backward peak is the largest of each phase with the gradients alive
in it (none in the first forward: they are set to none each step), on top of weights, states, gathered
parameters and buffers; the peak, the larger of that and the optimizer step (states, weights, reduced
gradients and its temporary; activations are freed by then). Checked against one rank of BigScience's
layouts (tr1-13B, BLOOM-176B) measured by `bigscience plan --measure`, term by term (tests/test_measure.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bigscience_train.model.output_chunks import chunk_tokens
from bigscience_train.model.shape import GPTShape, Position
from bigscience_train.parallel.dims import ParallelDims

GIB = 1024**3
# The planner's terms under the kinds a dry run measures (dryrun/rank_step.py); what it cannot tell apart
# (everything a step allocates and frees) it measures together as activations, at their largest at one time:
# MemoryEstimate.transient.
MEASURED_KINDS = {
    "weights": ("weights",),
    "gradients": ("gradients",),
    "optimizer states": ("optimizer states",),
    "gathered parameters": ("gathered parameters",),
    "buffers": ("ALiBi bias",),
}


@dataclass(frozen=True)
class Layout:
    """One candidate of the planner: the job's dims (ParallelDims decides what they imply) and the micro
    batch, which ParallelDims does not hold."""

    dims: ParallelDims
    micro_batch: int

    def micro_batches(self, global_batch: int) -> int:
        return self.dims.micro_batches(global_batch, self.micro_batch)

    def __str__(self) -> str:
        return f"{self.dims} mbs={self.micro_batch} recompute={self.dims.recompute}"


@dataclass
class ParameterCounts:
    total: int
    embedding: int  # word embeddings (and learned positions), held by the first stage (and tied on the last)
    per_layer: int
    per_rank_layer: int  # one layer's share on one tensor-parallel rank
    per_rank_embedding: int
    per_rank_final: int  # final layernorm (+ untied output layer) on a last-stage rank


def parameter_counts(shape: GPTShape, tp: int) -> ParameterCounts:
    """Exact for our GPT of `shape` (its vocabulary padded for tp): per layer 12h^2 + 13h (qkv, dense, two MLP
    matrices with biases, two layernorms).

    Tensor parallelism splits the matmul weights, the column-parallel biases (qkv, h->4h) and the vocabulary;
    row-parallel biases and layernorms are replicated.
    """
    h, s, v = shape.hidden_size, shape.seq_length, shape.vocab_size
    learned = shape.position == Position.learned
    embedding = v * h + (s * h if learned else 0) + (2 * h if shape.embedding_layernorm else 0)
    per_layer = 12 * h * h + 13 * h
    output = 0 if shape.tie_embeddings else v * h
    per_rank_embedding = v * h // tp + (s * h if learned else 0)
    per_rank_embedding += 2 * h if shape.embedding_layernorm else 0
    return ParameterCounts(
        total=embedding + shape.num_layers * per_layer + 2 * h + output,
        embedding=embedding,
        per_layer=per_layer,
        per_rank_layer=12 * h * h // tp + 7 * h // tp + 6 * h,
        per_rank_embedding=per_rank_embedding,
        per_rank_final=2 * h + output // tp,
    )


def stage_layers(num_layers: int, pp: int, count_embeddings: bool) -> tuple[int, int, int]:
    """Transformer layers on the (first, middle, last) stage; with BigScience's balancing the embedding and the
    output layer each take one layer's slot on their stage."""
    if pp == 1:
        return num_layers, num_layers, num_layers
    units = (num_layers + 2) // pp if count_embeddings else num_layers // pp
    edge = units - 1 if count_embeddings else units
    return edge, units, edge


def in_flight(dims: ParallelDims, micro_batches: int) -> float:
    p = dims.pp
    if p == 1:
        return 1.0
    if dims.pp_schedule == "gpipe":
        return float(micro_batches)
    if dims.pp_schedule == "interleaved_1f1b":
        return min(float(micro_batches), p + (p - 1) / dims.virtual_stages)
    return float(min(p, micro_batches))


def layer_activation_bytes(sbh: float, tp: int, recompute: str, half: bool) -> float:
    if recompute == "full":
        return 4 * sbh
    if recompute == "selective":
        return (8 + 16 / tp) * sbh if half else 4 * (3 + 8 / tp) * sbh
    return (12 + 26 / tp) * sbh if half else 4 * (4 + 13 / tp) * sbh


@dataclass
class MemoryEstimate:
    terms: dict[str, float] = field(default_factory=dict)  # bytes, each at its largest during the step
    transient: float = 0.0  # what a step allocates and frees (activations and buffers), at its largest
    forward_backward_peak: float = 0.0
    optimizer_peak: float = 0.0
    parameters_per_rank: int = 0

    @property
    def peak(self) -> float:
        return max(self.forward_backward_peak, self.optimizer_peak)


@dataclass(frozen=True)
class StageRank:
    """What one rank of pipeline stage k holds, and the byte widths its tensors have."""

    layers: int
    has_embedding: bool
    has_output: bool
    parameters: int  # P_r: the rank's share of the stage's parameters
    per_rank_layer: int
    w: int  # training dtype
    hidden: (
        int  # the residual stream: data-parallel mixed precision casts each unit's inputs, autocast does not
    )
    reduce: int  # the gradient reduction's dtype


def stage_rank(cfg, dims: ParallelDims, stage: int) -> StageRank:
    half = cfg.precision.dtype.value != "fp32"
    w = 2 if half else 4
    shape = dims.model_shape(cfg.model)
    counts = parameter_counts(shape, dims.tp)
    first, middle, last = stage_layers(shape.num_layers, dims.pp, dims.pp_count_embeddings)
    has_embedding, has_output = stage == 0, stage == dims.pp - 1
    layers = first if has_embedding else last if has_output else middle
    p_rank = layers * counts.per_rank_layer
    p_rank += counts.per_rank_embedding if has_embedding or (has_output and shape.tie_embeddings) else 0
    p_rank += counts.per_rank_final if has_output else 0
    return StageRank(
        layers,
        has_embedding,
        has_output,
        p_rank,
        counts.per_rank_layer,
        w,
        hidden=w if half and dims.dp > 1 else 4,
        reduce=4 if dims.reduce_dtype == "fp32" else 2,
    )


def estimate_memory(cfg, layout: Layout, global_batch: int) -> MemoryEstimate:
    """The heaviest stage's estimate: the first (embedding, most micro batches in flight) or the last (logits)."""
    estimates = [stage_memory(cfg, layout, global_batch, k) for k in {0, layout.dims.pp - 1}]
    return max(estimates, key=lambda e: e.peak)


def stage_memory(cfg, layout: Layout, global_batch: int, stage: int) -> MemoryEstimate:
    """One rank of pipeline stage `stage` (0 .. pp - 1)."""
    dims = layout.dims
    t, d, p = dims.tp, dims.dp, dims.pp
    half = cfg.precision.dtype.value != "fp32"
    rank = stage_rank(cfg, dims, stage)
    w, hidden_bytes, layers, p_rank = rank.w, rank.hidden, rank.layers, rank.parameters
    has_embedding, has_output = rank.has_embedding, rank.has_output
    shape = dims.model_shape(cfg.model)
    h, s, b, v = shape.hidden_size, shape.seq_length, layout.micro_batch, shape.vocab_size
    sbh = s * b * h
    micro_batches = layout.micro_batches(global_batch)
    bias = (shape.num_heads / t) * s * s * (2 if half else 4) if shape.position == Position.alibi else 0.0
    fused = dims.fused_output_loss(cfg.train.fused_output_loss)
    if fused:
        chunk = min(chunk_tokens(v, on_gpu=cfg.cluster.device != "cpu"), b * s)
        logits = (6 if half else 4) * chunk * v + 4 * sbh + 4 * v * h
    else:
        logits = (10 if half else 8) * b * s * v / t + 4 * sbh
    logits_grad = 0 if fused else 4 * b * s * v / t

    shard = d if dims.fsdp else 1
    whole_gradients = dims.fsdp and (p > 1 or (dims.dp_shard == "zero1" and micro_batches > 1))
    # FSDP's units: each block, and the root (embedding, final layernorm, output layer) on its stage.
    block, root = rank.per_rank_layer, p_rank - layers * rank.per_rank_layer
    whole = rank.reduce * p_rank if whole_gradients else 0
    # Gradients in the training dtype that FSDP has not yet added into its fp32 accumulation: a block's in
    # its backward; the root's from its first use in backward to the end of the stage's backward (the output
    # layer's through all of it, the embedding's only at its end).
    fresh = w if whole_gradients and rank.reduce != w else 0
    fresh_output = fresh * root if has_output else 0
    fresh_block = fresh * block + fresh_output
    terms = {
        "weights": 4 * p_rank / shard,
        # Whole ones: the reduced shards replace them unit by unit at the end of the step.
        "gradients": whole + max(fresh_block, fresh * root) if whole_gradients else 4 * p_rank / shard,
        "optimizer states": 8 * p_rank / shard,
    }
    if dims.fsdp and dims.dp_shard in ("zero1", "zero2"):
        terms["gathered parameters"] = w * p_rank
    elif dims.fsdp and dims.dp_shard == "zero3":
        terms["gathered parameters"] = 2 * w * rank.per_rank_layer
    elif dims.replicas and half:
        terms["gathered parameters"] = w * p_rank
    if bias:
        terms["ALiBi bias"] = bias * (dims.virtual_stages if p > 1 else 1)
    if half and d == 1:
        terms["autocast weight copies"] = 2 * layers * 12 * h * h / t
    if p == 1 or dims.pp_schedule == "gpipe":
        flight = in_flight(dims, micro_batches)
    elif dims.pp_schedule == "interleaved_1f1b":
        flight = max(1.0, in_flight(dims, micro_batches) - stage)
    else:
        flight = float(min(p - stage, micro_batches))
    if dims.recompute == "full":
        per_layer = hidden_bytes * sbh
    else:
        per_layer = layer_activation_bytes(sbh, t, dims.recompute, half)
    # Besides each block's saved tensors, one residual stream's: the stage's output, which the pipeline keeps
    # for the micro batch's backward, or on the last stage the final layernorm's input.
    per_micro_batch = layers * per_layer + hidden_bytes * sbh
    if has_embedding and shape.embedding_layernorm:
        per_micro_batch += hidden_bytes * sbh
    terms["activations"] = per_micro_batch * flight
    # A block's backward: its gradient in and the MLP's 4h-wide one, in the dtype activations have.
    backward_buffers = (2 if half else 4) * (1 + 4 / t) * sbh
    if dims.recompute == "full":
        terms["recomputed layer"] = layer_activation_bytes(sbh, t, "none", half) + backward_buffers
    if has_output:
        terms["logits"] = logits
    if stage < p - 1:
        # The gradient being received for the next backward (received activations are the stage's input,
        # counted with the activations in flight).
        terms["pipeline buffers"] = hidden_bytes * sbh
    terms["temporary buffers"] = logits_grad if has_output else 0
    if whole_gradients:
        # The reduction after the last backward: one unit's reduce-scatter input, a copy of its gradients.
        terms["reduction buffer"] = rank.reduce * max(block, root)
    if dims.fsdp:
        # A unit's all-gather output before it is copied into the parameters, and the previous unit's,
        # which FSDP keeps until then.
        terms["gather buffers"] = 2 * w * max(block, root)
    # What is alive at once of the memory a step allocates and frees (besides the pipeline's buffer and the
    # autocast copies), and the gradients alive with it, in each phase of the step.
    layer_backward = terms.get("recomputed layer", backward_buffers)
    gather = terms.get("gather buffers", 0.0)
    grads = terms["gradients"] if not whole_gradients else whole
    phases = [
        # A backward with every micro batch in flight, through a block (recomputing it under full
        # recompute); zero3 gathers every unit for each forward and backward.
        (
            terms["activations"] + layer_backward + (gather if dims.dp_shard == "zero3" else 0),
            grads + fresh_block,
        ),
        # The last stage's output layer and loss of a micro batch with the logits' gradient, before its
        # backward reaches a unit.
        (terms["activations"] + terms.get("logits", 0.0) + terms["temporary buffers"], grads),
        # The last backward, one micro batch left, reducing each block after its backward; the root last.
        (
            max(per_micro_batch + layer_backward + rank.reduce * block, rank.reduce * root)
            if whole_gradients
            else per_micro_batch + layer_backward,
            grads + fresh_output,
        ),
        # The first micro batch's forward, where zero1 / zero2 gather each unit once a step: no gradients yet
        # (set to none every step).
        (per_micro_batch + gather, 0.0),
    ]
    shared = terms.get("pipeline buffers", 0.0) + terms.get("autocast weight copies", 0.0)
    transient = shared + max(alive for alive, _ in phases)
    # The optimizer step sees only reduced gradients: whole ones accumulated for one reduction are gone.
    states = terms["weights"] + 4 * p_rank / shard + terms["optimizer states"]
    persistent = terms["weights"] + terms["optimizer states"] + terms.get("gathered parameters", 0.0)
    persistent += terms.get("ALiBi bias", 0.0) + shared
    if micro_batches == 1 and p == 1:
        # Gradients are created (set_to_none each step) as backward frees the activations: with one
        # micro batch, the two peak at opposite ends of backward.
        forward_backward = persistent + max(terms["gradients"], transient - shared)
    else:
        forward_backward = persistent + max(alive + grads for alive, grads in phases)
    return MemoryEstimate(
        terms,
        transient=transient,
        forward_backward_peak=forward_backward,
        optimizer_peak=states
        + terms.get("ALiBi bias", 0.0)
        + terms.get("pipeline buffers", 0.0)
        + 4 * p_rank / shard,
        parameters_per_rank=p_rank,
    )
