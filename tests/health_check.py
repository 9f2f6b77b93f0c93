"""Run under torchrun by test_watchdog_health: rank R plays node nR and runs the job's health check once per
fault in argv (`none`, or a BIGSCIENCE_HEALTH_FAULT value), with a TIMEOUT s limit; rank 0 prints one JSON
line of each verdict. An `allreduce` fault leaves the process group unusable: it comes last."""

import json
import os
import sys
from dataclasses import asdict

import torch

from bigscience_train.parallel.dims import ParallelDims
from bigscience_train.parallel.env import init_parallel
from bigscience_train.parallel.health import FAULT_ENV, check_job

penv = init_parallel(ParallelDims(dp=int(os.environ["WORLD_SIZE"])))
for fault in sys.argv[1:]:
    os.environ[FAULT_ENV] = "" if fault == "none" else fault
    result = check_job(
        penv.rank, penv.world_size, f"n{penv.rank}", penv.device, torch.float32, float(os.environ["TIMEOUT"])
    )
    if penv.is_rank0:
        print(json.dumps({"fault": fault, "ok": result.ok, **asdict(result)}), flush=True)
# After a collective that timed out, a clean shutdown could wait on it.
sys.stdout.flush()
os._exit(0)
