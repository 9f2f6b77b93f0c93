"""Run under torchrun by test_watchdog_health: trains, and rank HANG_RANK stops itself (SIGSTOP) when step
HANG_STEP begins, as a rank on a node that froze would; it writes its pid to HANG_MARKER first, for the test
to kill it once the others have given up."""

import os
import signal
import sys
from pathlib import Path

from bigscience_train.config import load_config
from bigscience_train.parallel.env import init_parallel, job_dims, shutdown
from bigscience_train.train.loop import Trainer

HANG_RANK, HANG_STEP = int(os.environ["HANG_RANK"]), int(os.environ["HANG_STEP"])
MARKER = Path(os.environ["HANG_MARKER"])


class FreezingTrainer(Trainer):
    def train_step(self):
        if self.penv.rank == HANG_RANK and self.state.step + 1 == HANG_STEP:
            MARKER.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return super().train_step()


cfg = load_config(sys.argv[1:])
FreezingTrainer(cfg, init_parallel(job_dims(cfg))).run()
shutdown()
