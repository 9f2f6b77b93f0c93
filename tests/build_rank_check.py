"""Builds one rank of a big layout in this process (fake process group) and prints, as JSON, how much the
process grew while building (its peak resident memory; on a GPU, the peak allocated on it) and how many
bytes the rank's parameters hold.

Usage: python tests/build_rank_check.py MODEL TP PP DP ZERO RANK [DEVICE]
"""

import json
import resource
import sys

import torch

from bigscience_train.config import load_config
from bigscience_train.dryrun.fake_rank import init_fake_rank
from bigscience_train.parallel.build import ParallelModel
from bigscience_train.parallel.dims import ParallelDims
from bigscience_train.parallel.tensor import local_tensor

model, tp, pp, dp, zero, rank = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5], int(sys.argv[6])
device = sys.argv[7] if len(sys.argv) > 7 else "cpu"


def peak_rss() -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


cfg = load_config([f"model={model}"])
dims = ParallelDims(tp=tp, pp=pp, dp=dp, dp_shard=zero)
penv = init_fake_rank(dims, rank, device)
before = peak_rss()
built = ParallelModel(dims.model_shape(cfg.model), penv, seed=1)
grown = peak_rss() - before
held = sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in built.params)
print(json.dumps({"grown": grown, "held": held, "stages": [int(s) for s in built.model.transformer.h]}))
