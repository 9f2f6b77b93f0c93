"""Run under torchrun by test_parallel: trains a few steps with tensor parallelism, then checks that every
parameter the TP plan leaves replicated (layernorms, row-parallel biases) is bit-identical on all TP ranks."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bigscience_train.config import load_config
from bigscience_train.parallel.env import init_parallel, job_dims
from bigscience_train.train.loop import Trainer

cfg = load_config(sys.argv[1:])
penv = init_parallel(job_dims(cfg))
trainer = Trainer(cfg, penv)
trainer.run()
group = penv.mesh["tp"].get_group()
differing = []
for name, param in trainer.model.named_parameters():
    local = param.to_local() if isinstance(param, DTensor) and param.placements[0].is_replicate() else param
    if isinstance(local, DTensor):
        continue
    gathered = [torch.empty_like(local) for _ in range(penv.tp)]
    dist.all_gather(gathered, local.detach().contiguous(), group=group)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        differing.append(name)
if penv.is_rank0:
    print("replicas identical" if not differing else f"replicas differ: {differing}")
dist.destroy_process_group()
