"""Prints, as JSON, the data-parallel collectives of one training step (4 micro-batches) of rank 0 of a
(tp, pp=1, dp=4) layout, built in this process as that rank of a fake process group, for each ZeRO mode
and dtype given: {case: {"kind dtype": [count, bytes], "largest": bytes of the largest one}} over the dp
dimension.

Usage: [DEVICE=cuda] python tests/traffic_check.py TP ZERO:DTYPE:REDUCE_DTYPE ...
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from bigscience_train.dryrun.collectives import CollectiveRecorder, mesh_group_dims
from bigscience_train.dryrun.fake_rank import init_fake_rank
from bigscience_train.model.shape import GPTShape
from bigscience_train.parallel.build import ParallelModel
from bigscience_train.parallel.dims import ParallelDims

SHAPE = GPTShape(vocab_size=128, hidden_size=64, num_layers=4, num_heads=4, seq_length=16)
tp, results = int(sys.argv[1]), {}
device = os.environ.get("DEVICE", "cpu")
for case in sys.argv[2:]:
    zero, dtype, reduce_dtype = case.split(":")
    penv = init_fake_rank(ParallelDims(tp=tp, dp=4, dp_shard=zero, reduce_dtype=reduce_dtype), 0, device)
    model = ParallelModel(SHAPE, penv, seed=1, dtype=dtype)
    tokens = torch.randint(0, SHAPE.vocab_size, (2, SHAPE.seq_length), device=device)
    mask = torch.ones(tokens.shape, device=device)
    batches = [{"tokens": tokens, "labels": tokens, "loss_mask": mask}] * 4
    with CollectiveRecorder(mesh_group_dims(penv.mesh)) as recorder:
        model.forward_backward(batches, 1.0, train=True)
        model.reduce_gradients(1.0)
    results[case] = {
        f"{kind} {dt}": list(v) for (dim, kind, dt), v in recorder.summary().items() if dim == "dp"
    }
    results[case]["largest"] = max(c.bytes for c in recorder.records if c.dim == "dp")
    dist.destroy_process_group()
print(json.dumps(results))
