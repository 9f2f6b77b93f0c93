"""Run under torchrun by test_train: trains while rank SLOW_RANK sleeps SLOW_SECONDS at the end of every
step's backward, as a rank on a slow node would compute. (There, the others wait in the step's next blocking
collective; on CPU, FSDP's own reductions block inside backward, where the wait counts as backward.)"""

import os
import sys
import time

from bigscience_train.config import load_config
from bigscience_train.parallel.env import init_parallel, job_dims, shutdown
from bigscience_train.train.loop import Trainer

SLOW_RANK, SLOW_SECONDS = int(os.environ["SLOW_RANK"]), float(os.environ["SLOW_SECONDS"])


class SlowRankTrainer(Trainer):
    def __init__(self, cfg, penv):
        super().__init__(cfg, penv)
        forward_backward = self.parallel.forward_backward

        def slow_forward_backward(batches, loss_scale, train):
            total = forward_backward(batches, loss_scale, train)
            if train and self.penv.rank == SLOW_RANK:
                time.sleep(SLOW_SECONDS)
            return total

        self.parallel.forward_backward = slow_forward_backward


cfg = load_config(sys.argv[1:])
SlowRankTrainer(cfg, init_parallel(job_dims(cfg))).run()
shutdown()
