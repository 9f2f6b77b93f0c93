"""What a training job does once the trainer has exited: end the chain, or leave it to the next job.

`python -m bigscience_train.slurm.chain RUN_DIR --exit-code RC [--kill-switch PATH] [--chain]`, the last line
of every rendered training script. The trainer leaves RUN_DIR/last_stop.json when it stops cleanly (the
script deletes it before starting, so it is this job's). A finished run, a failed one (non-finite losses, fp16
stuck at its minimum loss scale) or a kill switch cancels the jobs of the chain still pending; an
interruption (signal, time guard) lets the next one resume from `latest`. So does an aborted job (a hang, a
node that failed the health check), which fails; after a failed health check the rest of the chain is
submitted again, rendered with RUN/slurm/excluded_nodes in its --exclude.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bigscience_train.excluded_nodes import read_excluded_nodes
from bigscience_train.last_stop import ABORTED_STOPS, FAILED_STOPS, read_last_stop
from bigscience_train.slurm import SlurmError


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


def _chain_goes_on(chain: bool) -> bool:
    return chain and os.environ.get("SLURM_ARRAY_TASK_ID") != os.environ.get("SLURM_ARRAY_TASK_MAX")


def resubmit_without_excluded(run_dir: Path) -> str:
    """The rest of this chain submitted again (to start once this job ends), and its pending tasks cancelled
    either way: they were queued before the excluded nodes were known, and would land on them again."""
    from bigscience_train.slurm.submit import resubmit_chain

    first, last = int(os.environ["SLURM_ARRAY_TASK_ID"]) + 1, os.environ["SLURM_ARRAY_TASK_MAX"]
    try:
        array = resubmit_chain(run_dir, first, dependency=f"afterany:{os.environ['SLURM_JOB_ID']}")
        submitted = f"the rest of the chain (tasks {first}-{last}) is array {array}"
    except (SlurmError, ValueError, OSError) as e:
        submitted = f"submitting the rest of the chain again failed ({e}): submit again to continue"
    return f"{submitted}; {cancel_pending_chain()}"


def aborted(run_dir: Path, last: dict, chain: bool) -> str:
    """What an aborted job (last_stop's reason in ABORTED_STOPS) leaves to the next one."""
    what = {"hang": "the job hung", "health": "the node health check failed"}[last["reason"]]
    message = f"{what} at step {last['step']}: {last.get('error', last['reason'])}"
    excluded = read_excluded_nodes(run_dir)
    if excluded:
        message += f"; excluded nodes: {','.join(excluded)} (later jobs are rendered with --exclude)"
    start = f"checkpoint {last['checkpoint']}" if last["checkpoint"] else "the start (no checkpoint yet)"
    if not _chain_goes_on(chain):
        return f"{message}; submit again to continue from {start}"
    if last["reason"] == "health" and excluded:
        return f"{message}; {resubmit_without_excluded(run_dir)}"
    return f"{message}; the next job of the chain resumes from {start}"


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
    if last["reason"] in ABORTED_STOPS:
        return exit_code or 1, aborted(run_dir, last, chain)
    if last["finished"]:
        end = cancel_pending_chain() if chain else "no chain"
        return 0, f"training finished at step {last['step']} ({last['reason']}); {end}"
    nxt = "the next job of the chain resumes" if _chain_goes_on(chain) else "submit again to continue"
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
