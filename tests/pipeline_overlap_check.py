"""Prints, as JSON, when rank R of a (pp=2, dp=2) layout reduces its gradients over dp in one training step of
4 micro-batches, built in this process as that rank of a fake process group, for each case given: the
reductions (reduce-scatters, or all-reduces for replicas) issued during the stage's backward passes, and those
issued by the schedule's final gradient reduction after them: {case: {"during_backward": n, "after_backward":
n, "stages": [...]}}.

Usage: python tests/pipeline_overlap_check.py RANK:SCHEDULE:ZERO:VIRTUAL_STAGES ...
"""

import json
import sys

import torch
import torch.distributed as dist

from bigscience_train.dryrun.collectives import CollectiveRecorder, mesh_group_dims
from bigscience_train.dryrun.fake_rank import init_fake_rank
from bigscience_train.dryrun.rank_step import static_pipeline_vote
from bigscience_train.model.shape import GPTShape
from bigscience_train.parallel.build import ParallelModel
from bigscience_train.parallel.dims import ParallelDims
from bigscience_train.parallel.pipeline import TimedStage

SHAPE = GPTShape(vocab_size=128, hidden_size=64, num_layers=4, num_heads=4, seq_length=16)
final_reduction = TimedStage.perform_reduce_grad
recorder: CollectiveRecorder | None = None
# Indices of the records issued inside a stage's final reduction.
in_final: set[int] = set()


def observed_final_reduction(stage, *args, **kwargs):
    start = len(recorder.records)
    try:
        return final_reduction(stage, *args, **kwargs)
    finally:
        in_final.update(range(start, len(recorder.records)))


TimedStage.perform_reduce_grad = observed_final_reduction
results = {}
for case in sys.argv[1:]:
    rank, schedule, zero, virtual = case.split(":")
    dims = ParallelDims(pp=2, dp=2, dp_shard=zero, pp_schedule=schedule, virtual_stages=int(virtual))
    penv = init_fake_rank(dims, int(rank))
    model = ParallelModel(SHAPE, penv, seed=1)
    tokens = torch.randint(0, SHAPE.vocab_size, (1, SHAPE.seq_length))
    batches = [{"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(tokens.shape)}] * 4
    recorder, in_final = CollectiveRecorder(mesh_group_dims(penv.mesh)), set()
    with recorder, static_pipeline_vote():
        model.forward_backward(batches, 1.0, train=True)
    dist.destroy_process_group()
    reduced = [
        i
        for i, c in enumerate(recorder.records)
        if c.dim == "dp" and c.kind in ("reduce_scatter", "all_reduce")
    ]
    results[case] = {
        "during_backward": sum(i not in in_final for i in reduced),
        "after_backward": sum(i in in_final for i in reduced),
        "stages": [int(s) for s in model.pipeline.stage_ids],
    }
print(json.dumps(results))
