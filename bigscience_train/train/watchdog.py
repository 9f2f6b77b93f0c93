"""The hang watchdog: when no training step has finished for train.hang_timeout_minutes, every rank writes
the Python stacks of all its threads to RUN/hangs/<job>/rank<N>.txt and the process exits, so that the job
ends (and a chain's next job resumes from `latest`) well before the collective timeout would end it.

A rank whose peer has stopped (SIGSTOP, a dead node, a lost link) is blocked inside a collective and can do
nothing itself: the watchdog is a thread of each rank, with its own timer. No message between ranks is
needed to tell that the hang is global: a collective that never completes stops the steps of every live rank,
so each live rank's timer runs out within a poll of the others. A rank that is itself stopped writes nothing.

The timer starts when the job's first step finishes (the first step pays compilation and lazy set-up of
communicators and data): a hang before it ends the job at the collective timeout (parallel.timeout_minutes).
Time between steps (checkpoint saves, validation, step hooks) counts: the timeout must exceed the longest.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bigscience_train.checkpoint.paths import latest_checkpoint
from bigscience_train.fsutil import atomic_path
from bigscience_train.last_stop import write_last_stop

HANGS_DIR = "hangs"
# The exit status of a rank the watchdog ended (timeout(1)'s "timed out").
HANG_EXIT_CODE = 124


def job_label() -> str:
    """The directory name of this job's hang reports: the Slurm job, else torchrun's run id (the same on every
    rank of the job), else `local`."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "local"


def hang_report_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / HANGS_DIR / job_label() / f"rank{rank}.txt"


class HangWatchdog:
    """`beat(step)` after every step; a daemon thread fires once no beat came for `timeout_s` seconds:
    writes `report` (a header and faulthandler's stacks of every thread), calls `on_hang(step)` (rank 0
    records the stop), and ends the process with os._exit, which no thread stuck in gloo or NCCL can hold up."""

    def __init__(
        self,
        timeout_s: float,
        report: Path,
        on_hang: Callable[[int], None] = lambda step: None,
        exit_code: int = HANG_EXIT_CODE,
    ):
        self.timeout_s, self.report, self.on_hang, self.exit_code = timeout_s, report, on_hang, exit_code
        self._last_beat: float | None = None
        self._step = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)

    def beat(self, step: int) -> None:
        """A step finished; the first call arms the watchdog."""
        self._step, self._last_beat = step, time.monotonic()
        if not self._thread.is_alive() and not self._stopped.is_set():
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            idle = time.monotonic() - self._last_beat
            if idle >= self.timeout_s:
                self._fire(idle)

    @property
    def poll_s(self) -> float:
        # A few checks per timeout: each live rank fires within a poll of the others.
        return min(self.timeout_s / 10, 5.0)

    def _fire(self, idle: float) -> None:
        step = self._step
        try:
            self.write_report(idle, step)
            self.on_hang(step)
        finally:
            print(
                f"hang watchdog: no training step finished for {idle:.0f} s (limit {self.timeout_s:g} s) since "
                f"step {step}; Python stacks in {self.report}; exiting with code {self.exit_code}",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            # The launcher kills the whole job once one rank exits: two polls more let every live rank, whose
            # timer runs out within a poll of this one's, write its stacks first.
            time.sleep(2 * self.poll_s)
            os._exit(self.exit_code)

    def write_report(self, idle: float, step: int) -> None:
        threads = ", ".join(f"{t.name} = 0x{t.ident:x}" for t in threading.enumerate() if t.ident)
        with atomic_path(self.report) as tmp, tmp.open("w") as f:
            f.write(
                f"pid {os.getpid()}: no training step finished for {idle:.0f} s since step {step} "
                f"({time.strftime('%Y-%m-%dT%H:%M:%S')})\nthreads: {threads}\n\n"
            )
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)


def run_watchdog(
    minutes: float | None, run_dir: str | Path, rank: int, consumed_tokens: Callable[[], int]
) -> HangWatchdog | None:
    """One rank's watchdog of a run (None when train.hang_timeout_minutes is null). Rank 0's records the stop
    in last_stop.json (reason `hang`, the last finished step and the checkpoint the next job resumes from)."""
    if minutes is None:
        return None
    run_dir = Path(run_dir)
    report = hang_report_path(run_dir, rank)

    def record(step: int) -> None:
        latest = latest_checkpoint(run_dir / "checkpoints")
        error = f"no training step finished for {minutes:g} min after step {step}; stacks in {report.parent}"
        write_last_stop(
            run_dir, "hang", step, consumed_tokens(), latest.name if latest else None, error=error
        )

    return HangWatchdog(minutes * 60, report, record if rank == 0 else lambda step: None)
