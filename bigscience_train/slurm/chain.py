"""What a training job does once the trainer has exited: end the chain, or leave it to the next job.

`python -m bigscience_train.slurm.chain RUN_DIR --exit-code RC [--kill-switch PATH] [--chain]`, the last line
of every rendered training script. The trainer leaves RUN_DIR/last_stop.json when it stops cleanly (the
script deletes it before starting, so it is this job's). A finished run, a failed one (non-finite losses, fp16
stuck at its minimum loss scale) or a kill switch cancels the jobs of the chain still pending; an
interruption (signal, time guard) lets the next one resume from `latest`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bigscience_train.last_stop import FAILED_STOPS, read_last_stop


def cancel_pending_chain() -> str:
    """scancel the pending jobs of this array (the rest of the chain); the running one is this job."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if not array_job:
        return "no chain to end"
    done = subprocess.run(
        ["scancel", "--state=PENDING", array_job], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return f"scancel of the rest of chain {array_job} failed: {done.stderr.strip()}"
    return f"cancelled the pending jobs of chain {array_job}"


def decide(run_dir: Path, exit_code: int, kill_switch: str | None, chain: bool) -> tuple[int, str]:
    """(exit code of the job, message)."""
    last = read_last_stop(run_dir)
    if kill_switch and Path(kill_switch).exists():
        end = cancel_pending_chain() if chain else "no chain"
        step = f" at step {last['step']}" if last else ""
        return 0, f"kill switch {kill_switch} is on: the run stops{step}; {end}"
    if last is None:
        return exit_code or 1, (
            f"training exited with code {exit_code} without a clean stop; "
            "a next job of the chain resumes from the latest checkpoint"
        )
    if last["reason"] in FAILED_STOPS:
        end = cancel_pending_chain() if chain else "no chain"
        return exit_code or 1, (
            f"training failed at step {last['step']}: {last.get('error', last['reason'])}; the stuck state is not "
            f"resumed ({end}); roll back to an earlier checkpoint or change the run, then submit again"
        )
    if last["finished"]:
        end = cancel_pending_chain() if chain else "no chain"
        return 0, f"training finished at step {last['step']} ({last['reason']}); {end}"
    more = chain and os.environ.get("SLURM_ARRAY_TASK_ID") != os.environ.get("SLURM_ARRAY_TASK_MAX")
    nxt = "the next job of the chain resumes" if more else "submit again to continue"
    return 0, f"stopped at step {last['step']} ({last['reason']}), checkpoint {last['checkpoint']}; {nxt}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bigscience_train.slurm.chain")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--exit-code", type=int, required=True)
    parser.add_argument("--kill-switch", default="")
    parser.add_argument("--chain", action="store_true", help="this job is one of a chain (an array %%1)")
    args = parser.parse_args(argv)
    code, message = decide(args.run_dir, args.exit_code, args.kill_switch or None, args.chain)
    print(f"[chain] {message}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
