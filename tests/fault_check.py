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
from bigscience_train.parallel.env import init_parallel, job_dims
from bigscience_train.parallel.tensor import local_tensor
from bigscience_train.train.loop import NonFiniteLossError, Trainer

KIND, RANK, STEPS = os.environ["FAULT"], int(os.environ["FAULT_RANK"]), os.environ["FAULT_STEPS"]
FIRST, REPEAT = int(STEPS.rstrip("-")), STEPS.endswith("-")


class FaultyTrainer(Trainer):
    """Injects the fault into this rank's step through the trainer's ParallelModel."""

    skipped: list[int]

    def __init__(self, cfg, penv):
        super().__init__(cfg, penv)
        forward_backward, reduce_gradients = self.parallel.forward_backward, self.parallel.reduce_gradients

        def faulty_forward_backward(batches, loss_scale, train):
            total = forward_backward(batches, loss_scale, train)
            if train and KIND == "loss" and self._hit():
                total[0] = float("nan")
            return total

        def faulty_reduce_gradients(loss_scale):
            params = reduce_gradients(loss_scale)
            if KIND == "grad" and self._hit():
                local_tensor(params[-1].grad).fill_(float("inf"))
            return params

        self.parallel.forward_backward = faulty_forward_backward
        self.parallel.reduce_gradients = faulty_reduce_gradients

    def _hit(self) -> bool:
        step = self.state.step + 1
        return self.penv.rank == RANK and (step >= FIRST if REPEAT else step == FIRST)

    def train_step(self):
        out = super().train_step()
        if out["skipped"]:
            self.skipped.append(self.state.step)
        return out


cfg = load_config(sys.argv[1:])
penv = init_parallel(job_dims(cfg))
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
