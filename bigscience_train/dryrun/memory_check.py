"""The planner's memory prediction checked against what training really allocates, on this machine.

Runs a few steps of the real trainer (one process) under torch's MemTracker, which follows every tensor
storage as it is created and freed and records the peak; the first step is skipped (the optimizer states do
not exist before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from bigscience_train.parallel.dims import ParallelDims
from bigscience_train.parallel.env import init_parallel
from bigscience_train.plan.estimate import layout_of, make_plan
from bigscience_train.train.loop import Trainer


@dataclass
class MemoryCheck:
    predicted: float
    measured: float
    measured_by_kind: dict[str, int]

    @property
    def relative_error(self) -> float:
        return (self.predicted - self.measured) / self.measured


def measure_memory(cfg, steps: int = 2) -> MemoryCheck:
    """Peak bytes the trainer allocated over `steps` steps after the first, against the plan's peak."""
    if cfg.train.global_batch_size != cfg.train.micro_batch_size or cfg.train.rampup_batch_size:
        raise ValueError("measure one micro batch per step: MemTracker follows one forward per module")
    trainer = Trainer(cfg, init_parallel(ParallelDims.from_config(cfg, 1)))
    trainer.train_step()
    tracker = MemTracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    with tracker:
        for _ in range(steps):
            trainer.train_step()
            tracker.reset_mod_stats()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    predicted = make_plan(cfg, layout_of(cfg)).memory.peak
    return MemoryCheck(predicted, float(peak["Total"]), {k: v for k, v in peak.items() if k != "Total"})
