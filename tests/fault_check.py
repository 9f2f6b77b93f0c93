"""Run under torchrun by test_parallel: trains with a fault injected on one rank only, then prints (rank 0) a
JSON line: the steps each rank skipped, each rank's error, and whether data-parallel replicas still hold
identical weights.

FAULT=grad: an infinite gradient, after the gradient reductions (so only the mesh-wide overflow check can
tell the other ranks). FAULT=loss: a NaN loss. FAULT_RANK: the rank. FAULT_STEPS: "3" (step 3) or "3-"
(step 3 and every later one).
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from bigscience_train.config import load_config
from bigscience_train.parallel.env import init_parallel
from bigscience_train.parallel.tensor import local_tensor
from bigscience_train.train.loop import NonFiniteLossError, Trainer

KIND, RANK, STEPS = os.environ["FAULT"], int(os.environ["FAULT_RANK"]), os.environ["FAULT_STEPS"]
FIRST, REPEAT = int(STEPS.rstrip("-")), STEPS.endswith("-")


class FaultyTrainer(Trainer):
    skipped: list[int]

    def _hit(self) -> bool:
        step = self.state.step + 1
        return self.penv.rank == RANK and (step >= FIRST if REPEAT else step == FIRST)

    def _forward_backward(self, batches, loss_scale, train):
        total = super()._forward_backward(batches, loss_scale, train)
        if train and KIND == "loss" and self._hit():
            total[0] = float("nan")
        return total

    def _reduce_grads(self, params):
        super()._reduce_grads(params)
        if KIND == "grad" and self._hit():
            local_tensor(params[-1].grad).fill_(float("inf"))

    def train_step(self):
        out = super().train_step()
        if out["skipped"]:
            self.skipped.append(self.state.step)
        return out


cfg = load_config(sys.argv[1:])
penv = init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp)
trainer = FaultyTrainer(cfg, penv)
trainer.skipped = []
error = None
try:
    trainer.run()
except NonFiniteLossError as e:
    error = str(e)
identical = True
for param in trainer.model.parameters():
    local = local_tensor(param).detach().contiguous()
    gathered = [torch.empty_like(local) for _ in range(penv.dp)]
    dist.all_gather(gathered, local, group=penv.dp_group())
    identical &= all(torch.equal(gathered[0], g) for g in gathered[1:])
report = penv.all_gather_object({"skipped": trainer.skipped, "error": error, "identical": identical})
if penv.is_rank0:
    print(json.dumps(report))
dist.destroy_process_group()
