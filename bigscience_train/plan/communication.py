"""Bytes one rank of pipeline stage k sends through collectives in one step, per mesh dimension.

A collective's size is that of its larger tensor: the whole one an all-gather assembles or a reduce-scatter
splits, the tensor an all-reduce sums, the message a send carries. Notation as plan/memory.py: m micro
batches per step, L_k the stage's layers, P_k the rank's parameters on the stage, U_k = L_k + 1 FSDP units
(each block, and the rest), w the training dtype's bytes, r the reduce dtype's, x the residual stream's (w
under data-parallel mixed precision, else 4), sbh = s b h (divided by t with sequence parallelism).

- dp: replicas all-reduce r P_k once per step. zero1 all-gathers w P_k (the parameters, once) and
  reduce-scatters r P_k (the gradients, once). zero2 reduce-scatters after every micro batch (m r P_k) when
  there is no pipeline; through a pipeline torch's schedule reduces once, as zero1. zero3 gathers again for
  each micro batch's forward and backward: 2 m w P_k, and reduces per micro batch.
- tp: per layer and micro batch, two all-reduces of x sbh forward (the row-parallel outputs) and two of
  their gradients backward (the column-parallel inputs), one more with full recompute (the recomputed
  forward stops at the last activation backward needs); the vocab-parallel embedding's output on the first
  stage, the output layer's input gradient on the last.
- pp: every micro batch's activations go forward and its gradients back across each stage boundary the rank's
  model parts have (v of them with interleaved stages), x sbh each; first and last stage exchange their copies
  of the tied embedding's gradient, 4 V h / t (/ d when sharded), once.
Scalars (loss totals, norms, decisions) are left out: bytes, not latency, are what this counts.
"""

from __future__ import annotations

from bigscience_train.plan.memory import Layout, stage_rank


def stage_traffic(cfg, layout: Layout, global_batch: int, stage: int) -> dict[str, float]:
    """{mesh dimension: bytes per step} for one rank of pipeline stage `stage`."""
    dims = layout.dims
    t, d, p = dims.tp, dims.dp, dims.pp
    rank = stage_rank(cfg, dims, stage)
    w, x, r, p_rank = rank.w, rank.hidden, rank.reduce, rank.parameters
    shape = dims.model_shape(cfg.model)
    m = layout.micro_batches(global_batch)
    sbh = shape.seq_length * layout.micro_batch * shape.hidden_size / (t if dims.sequence_parallel else 1)

    traffic: dict[str, float] = {}
    if d > 1:
        if dims.dp_shard == "none":
            traffic["dp"] = r * p_rank
        elif dims.dp_shard == "zero3":
            traffic["dp"] = m * (2 * w + r) * p_rank
        elif dims.dp_shard == "zero2" and p == 1:
            traffic["dp"] = (w + m * r) * p_rank
        else:
            traffic["dp"] = (w + r) * p_rank
    if t > 1:
        per_layer = 5 if dims.recompute == "full" else 4
        edges = int(rank.has_embedding) + int(rank.has_output)
        traffic["tp"] = m * (rank.layers * per_layer + edges) * x * sbh
    if p > 1:
        # The rank's model parts are pipeline stages k, k + p, ... of p v (interleaved: v > 1).
        v = dims.virtual_stages
        parts = [stage + j * p for j in range(v)]
        boundaries = sum(int(s > 0) + int(s < p * v - 1) for s in parts)
        tied = 0.0
        if shape.tie_embeddings and (rank.has_embedding or rank.has_output):
            tied = 4 * shape.vocab_size * shape.hidden_size / t / (d if dims.fsdp else 1)
        traffic["pp"] = 2 * boundaries * m * x * sbh + 2 * tied
    return traffic
