"""Requests to checkpoint and stop at the next step boundary: a signal, or a kill-switch file.

A scheduler sends the signal ahead of a wall-clock limit (Slurm's `--signal`); the handler only records it,
and the loop acts on it between steps, when the model and optimizer are consistent. This module knows
nothing of Slurm or of ranks: the loop reduces each rank's answer over the job.
"""

from __future__ import annotations

import signal
from pathlib import Path

from bigscience_train.config.validate import signal_number

_received: set[str] = set()


def catch(name: str) -> None:
    """Record `name` when it arrives instead of dying of it. Idempotent; call it as early as possible, so
    that a signal sent while the job is still starting is not lost."""
    number = signal_number(name)
    signal.signal(number, lambda signum, frame: _received.add(number.name))


class StopRequests:
    def __init__(self, stop_signal: str, kill_switch: str | None):
        self.stop_signal = signal_number(stop_signal).name
        self.kill_switch = Path(kill_switch) if kill_switch else None
        # A signal that arrived while the process was starting counts: catch() ran before anything slow.
        catch(self.stop_signal)

    def signalled(self) -> bool:
        return self.stop_signal in _received

    def acknowledge(self) -> None:
        """The run stopped for the signal: a later run in this process starts without it."""
        _received.discard(self.stop_signal)

    def kill_switch_on(self) -> bool:
        return self.kill_switch is not None and self.kill_switch.exists()
