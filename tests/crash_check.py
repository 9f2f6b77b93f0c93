"""Run under torchrun --max-restarts by test_train: trains, and rank CRASH_RANK dies at step CRASH_STEP the
first time only (CRASH_MARKER is created as it dies), as a rank on a failing node would."""

import os
import sys
from pathlib import Path

from bigscience_train.config import load_config
from bigscience_train.parallel.env import init_parallel, job_dims, shutdown
from bigscience_train.train.loop import Trainer

CRASH_RANK, CRASH_STEP = int(os.environ["CRASH_RANK"]), int(os.environ["CRASH_STEP"])
MARKER = Path(os.environ["CRASH_MARKER"])


class CrashingTrainer(Trainer):
    def train_step(self):
        if self.penv.rank == CRASH_RANK and self.state.step + 1 == CRASH_STEP and not MARKER.exists():
            MARKER.touch()
            os._exit(1)
        return super().train_step()


cfg = load_config(sys.argv[1:])
CrashingTrainer(cfg, init_parallel(job_dims(cfg))).run()
shutdown()
