"""The time a training step waits on communication that nothing overlaps.

Two kinds: the collectives the step blocks on after backward (gradient completion, the gradient norm, the
loss totals and the overflow check), timed around each; and the tail of backward's gradient reductions
that computation did not hide, timed from the end of backward's computation to FSDP's finishing callback
(autograd runs queued callbacks in order, so one queued at backward's start runs just before FSDP's, and
queues one more to run after it). On a GPU the device is synchronised at each mark, so the time is the
device's, not the host's. On a CPU, where FSDP's reductions have no stream to run on and block inside
backward, only the waits after backward count.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.autograd import Variable


def device_time(device: torch.device) -> float:
    """Seconds on a clock the device has caught up with (its queued work done first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class CommWait:
    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._tail_start = 0.0

    def _now(self) -> float:
        return device_time(self.device)

    def take(self) -> float:
        """The seconds gathered since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    @contextlib.contextmanager
    def blocking(self):
        start = self._now()
        try:
            yield
        finally:
            self.seconds += self._now() - start

    def time_backward_tail(self, loss: torch.Tensor) -> None:
        """Times the wait at the end of the backward that `loss` starts (before calling backward on it)."""
        if loss.requires_grad:
            loss.register_hook(self._at_backward_start)

    def _at_backward_start(self, grad: torch.Tensor) -> None:
        Variable._execution_engine.queue_callback(self._at_compute_end)

    def _at_compute_end(self) -> None:
        self._tail_start = self._now()
        Variable._execution_engine.queue_callback(self._at_reductions_end)

    def _at_reductions_end(self) -> None:
        self.seconds += self._now() - self._tail_start
