"""The training loop: micro-batches with gradient accumulation, batch-size ramp-up, LR schedule, AdamW,
gradient clipping, mixed precision, periodic validation, checkpoints and metrics.

Parallelism enters through `ParallelEnv` (ranks, mesh, layout) and `ParallelModel`, which runs every
layout-dependent part of a step; the loop itself is the same for one process and for many. Work that is not
training (zero-shot tasks on the live model) is attached from outside as step hooks.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

from bigscience_train import __version__
from bigscience_train.carbon.aggregate import carbon_totals
from bigscience_train.carbon.tracker import NodeTracker
from bigscience_train.checkpoint.dcp import CheckpointManager, TrainState, step_dir_name
from bigscience_train.checkpoint.reader import resolve_checkpoint
from bigscience_train.checkpoint.rollback import REQUEST, finish_rollback, pending_rollback
from bigscience_train.config import to_yaml
from bigscience_train.data.gpt_data import build_splits, collate
from bigscience_train.data.sampling import micro_batch_indices
from bigscience_train.data.tokenizer import Tokenizer
from bigscience_train.fsutil import atomic_write_text
from bigscience_train.last_stop import FAILED_STOPS, FINISHED_STOPS, read_last_stop, write_last_stop
from bigscience_train.metrics.flops import flops_per_iteration
from bigscience_train.metrics.peak import device_peak_flops
from bigscience_train.metrics.writer import MetricsWriter
from bigscience_train.parallel.build import ParallelModel
from bigscience_train.parallel.comm_wait import device_time
from bigscience_train.parallel.env import ParallelEnv
from bigscience_train.schedules import BatchSizeSchedule, LRSchedule, total_train_samples
from bigscience_train.train.precision import DynamicLossScaler
from bigscience_train.train.preflight import node_name
from bigscience_train.train.stop import StopRequests
from bigscience_train.train.watchdog import run_watchdog

# A step's time, per phase (seconds), in every train record.
STEP_BREAKDOWN = ("data_time", "forward_backward_time", "optimizer_time", "comm_wait")

# Stops that interrupt a run (it continues in a later job), in order of precedence.
EXTERNAL_STOPS = ("kill_switch", "signal", "exit_duration")


class NonFiniteLossError(RuntimeError):
    """A run that cannot go on: `reason` is what last_stop.json records, so the chain ends instead of resuming."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class TrainResult:
    state: TrainState
    stop_reason: str
    first_val_loss: float | None
    last_val_loss: float | None
    checkpoint: Path | None


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and layernorm weights (Megatron's grouping). Tensor-parallel
    (DTensor) and plain parameters sit in separate groups: foreach kernels take one kind at a time."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    groups = []
    for sharded in (False, True):
        for decay in (True, False):
            members = [p for p in params if isinstance(p, DTensor) == sharded and (p.ndim >= 2) == decay]
            if members:
                groups.append({"params": members, "weight_decay": optim_cfg.weight_decay if decay else 0.0})
    # The fused kernel (one pass over each tensor) on GPUs, and on CPU where no parameter is a DTensor.
    fused = device.type == "cuda" or not any(isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(
        groups,
        lr=optim_cfg.lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2),
        eps=optim_cfg.eps,
        fused=fused,
        foreach=not fused,
    )


# Called after every optimizer step with the trainer (e.g. zero-shot evaluation every N steps).
StepHook = Callable[["Trainer"], None]


class Trainer:
    def __init__(self, cfg, penv: ParallelEnv, hooks: list[StepHook] | tuple[StepHook, ...] = ()):
        self.cfg, self.penv = cfg, penv
        self.hooks = list(hooks)
        self.run_dir = Path(cfg.run_dir)
        self.start_time = time.monotonic()
        tr = cfg.train
        self.tokenizer = Tokenizer.from_config(cfg.data)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"the tokenizer {self.tokenizer.source} has {self.tokenizer.vocab_size} tokens but "
                f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size"
            )
        self.shape = penv.dims.model_shape(cfg.model)
        if self.shape.attention == "flex" and penv.device.type == "cpu":
            raise ValueError(
                "model.attention=flex trains on GPUs only (torch's FlexAttention has no backward on CPU); "
                "use model.attention=sdpa"
            )
        seed_everything(tr.seed)
        self.dtype = cfg.precision.dtype.value
        if cfg.parallel.engine.value == "deepspeed":
            # DeepSpeed's engine holds the model, our AdamW and its own fp16 loss scaler.
            from bigscience_train.parallel.deepspeed_engine import DeepSpeedModel

            self.parallel = DeepSpeedModel(cfg, self.shape, penv, build_optimizer)
            self.optimizer, self.scaler = self.parallel.optimizer, self.parallel.scaler
        else:
            self.parallel = ParallelModel(
                self.shape, penv, tr.seed, self.dtype, tr.compile, tr.fused_output_loss
            )
            self.optimizer = build_optimizer(self.parallel.model, cfg.optim, penv.device)
            self.scaler = DynamicLossScaler.from_config(cfg.precision) if self.dtype == "fp16" else None
        self.model = self.parallel.model
        self.num_parameters = self.parallel.num_parameters

        self.batch_schedule = BatchSizeSchedule.from_config(tr.global_batch_size, list(tr.rampup_batch_size))
        seq = cfg.model.seq_length
        self.train_samples = total_train_samples(tr.iters, tr.tokens, seq, self.batch_schedule)
        self.eval_samples = tr.eval_iters * tr.global_batch_size
        opt = cfg.optim
        by_tokens = opt.decay_tokens is not None
        decay = opt.decay_tokens if by_tokens else (opt.decay_samples or self.train_samples)
        warmup = opt.warmup_samples * seq if by_tokens else opt.warmup_samples
        self.lr_by_tokens = by_tokens
        self.lr_schedule = LRSchedule(opt.lr, opt.min_lr, warmup, decay, opt.decay_style.value)
        named = list(cfg.data.valid)
        # Splits training does not read are not built: the test split (megatron-core refuses a weighted blend
        # one epoch of it), and with named validation sets data.blend's valid split.
        self.splits = build_splits(
            cfg.data, seq, self.tokenizer, (self.train_samples, 0 if named else self.eval_samples, 0)
        )
        self.valid_sets = {
            vs.name: build_splits(
                cfg.data, seq, self.tokenizer, (0, self.eval_samples, 0), vs.prefix, vs.split
            ).valid
            for vs in named
        }
        self.valid_weights = {vs.name: vs.weight for vs in named}

        self.state = TrainState()
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            penv,
            cfg.checkpoint.keep_last,
            cfg.checkpoint.keep_every,
            cfg.checkpoint.async_save,
            self.parallel.optimizer_aliases(),
            cfg.checkpoint.write_threads,
        )
        self.peak = device_peak_flops(penv.device, self.dtype)
        self.stop_requests = StopRequests(tr.stop_signal, tr.kill_switch)
        self.writer = None
        self.carbon: NodeTracker | None = None
        self.rollback_applied: dict | None = None
        self.recent_losses: deque[float] = deque(maxlen=cfg.logging.spike_window)
        self.job_first_step = 0
        self.skip_ranges = [(a, b) for a, b in tr.skip_iterations]
        # The train.skip_iterations range being skipped, once announced.
        self.skipping: tuple[int, int] | None = None

    # -- one optimizer step -------------------------------------------------------------------------------
    def _micro_batches(self, dataset, consumed: int, global_batch: int):
        tr = self.cfg.train
        for indices in micro_batch_indices(
            consumed, global_batch, tr.micro_batch_size, self.penv.dp_rank, self.penv.dp
        ):
            batch = collate(dataset, indices)
            yield {k: v.to(self.penv.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict:
        gbs = self.batch_schedule.at(self.state.consumed_samples)
        lr = self.lr_schedule.at(self._lr_progress()) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.parallel.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_scale = self.scaler.scale if self.scaler else 1.0
        device = self.penv.device
        start = device_time(device)
        batches = list(self._micro_batches(self.splits.train, self.state.consumed_samples, gbs))
        data_done = device_time(device)
        total = self.parallel.forward_backward(batches, loss_scale, train=True)
        backward_done = device_time(device)
        with self.parallel.comm_wait.blocking():
            self.penv.all_reduce_sum(total)
        loss = (total[0] / total[1].clamp(min=1)).item()
        params = self.parallel.reduce_gradients(loss_scale)
        grad_norm = self.parallel.clip_grad_norm(params, self.cfg.optim.clip_grad)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        # Decided over every rank, so that every rank skips, and stops, at the same step.
        with self.parallel.comm_wait.blocking():
            bad, bad_loss = (v > 0 for v in self.penv.all_reduce_max([not finite, not math.isfinite(loss)]))
        if self.scaler is not None:
            self.scaler.update(bad)
        if not bad:
            # An async checkpoint copies the weights and optimizer state aside while this step ran.
            self.checkpoints.wait_staged()
            optimizer_start = device_time(device)
            self.optimizer.step()
            optimizer_seconds = device_time(device) - optimizer_start
        else:
            optimizer_seconds = 0.0
        self._advance(gbs, trained=True)
        self.state.skipped_steps += int(bad)
        out = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "batch_size": gbs,
            "skipped": bad,
            "nonfinite_loss": bad_loss,
            "loss_scale": loss_scale,
        }
        # Where the step's time went (seconds): the communication wait is also inside forward and backward
        # (its exposed tail), and its blocking collectives come after them.
        comm_wait = self.parallel.comm_wait.take()
        out.update(
            data_time=data_done - start,
            forward_backward_time=backward_done - data_done,
            optimizer_time=optimizer_seconds,
            comm_wait=comm_wait,
        )
        bubble_theory = self.parallel.bubble_theory(len(batches))
        if bubble_theory is not None:
            out["pp_bubble"] = total[2].item() / (self.penv.pp * self.penv.dp)
            out["pp_bubble_theory"] = bubble_theory
        return out

    def _lr_progress(self) -> int:
        """Where the LR schedule stands: consumed samples (or tokens) less those of skipped iterations."""
        s = self.state
        if self.lr_by_tokens:
            return s.consumed_tokens - s.lr_skipped_tokens
        return s.consumed_samples - s.lr_skipped_samples

    def _advance(self, gbs: int, trained: bool) -> None:
        """One iteration done: its batch of `gbs` samples consumed, trained on or skipped."""
        s, tokens = self.state, gbs * self.cfg.model.seq_length
        s.step += 1
        s.consumed_samples += gbs
        s.consumed_tokens += tokens
        if not trained:
            s.lr_skipped_samples += gbs
            s.lr_skipped_tokens += tokens

    def _skip_iteration(self) -> bool:
        """Skips the next iteration when train.skip_iterations covers it: no forward, backward, optimizer or LR
        scheduler step (Megatron-DeepSpeed's training.py `continue`s before train_step, which alone steps its
        scheduler), while its batch is consumed at the ramp-up's size and it counts, so that the data and the
        stop conditions are those of a run that trained it. One line and record per range entered."""
        step = self.state.step + 1
        covering = next(((a, b) for a, b in self.skip_ranges if a <= step <= b), None)
        if covering is None:
            return False
        if self.skipping != covering:
            self.skipping = covering
            record = {"first": step, "last": covering[1], "range": list(covering)}
            if self.penv.is_rank0:
                print(
                    f"skipping iterations {step} to {covering[1]} (train.skip_iterations {list(covering)}): "
                    f"their batches are consumed untrained, the LR schedule holds"
                )
            if self.writer is not None:
                self.writer.log(self.record("skip", record))
        self._advance(self.batch_schedule.at(self.state.consumed_samples), trained=False)
        return True

    # -- validation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """val_loss and val_ppl; with data.valid's named sets, each set's too, as val_loss/<name>."""
        if self.cfg.train.eval_iters == 0:
            return None
        if not self.valid_sets:
            loss = self._valid_loss(self.splits.valid)
            return None if loss is None else {"val_loss": loss, "val_ppl": perplexity(loss)}
        losses = {name: self._valid_loss(dataset) for name, dataset in self.valid_sets.items()}
        losses = {name: loss for name, loss in losses.items() if loss is not None}
        if not losses:
            return None
        # val_loss stays one number (what TrainResult.last_val_loss reports and early stopping would read): the
        # mean of the sets' losses weighted by data.valid[].weight.
        weight = sum(self.valid_weights[name] for name in losses)
        loss = sum(self.valid_weights[name] * value for name, value in losses.items()) / weight
        values = {"val_loss": loss, "val_ppl": perplexity(loss)}
        for name, value in losses.items():
            values[f"val_loss/{name}"] = value
            values[f"val_ppl/{name}"] = perplexity(value)
        return values

    def _valid_loss(self, dataset) -> float | None:
        """The mean loss per token over the dataset's first eval_iters global batches."""
        if dataset is None:
            return None
        self.parallel.train(False)
        gbs = self.cfg.train.global_batch_size
        total = torch.zeros(3, dtype=torch.float64, device=self.penv.device)
        # The same first eval_iters batches every time, so successive validation losses compare.
        for i in range(min(self.cfg.train.eval_iters, len(dataset) // gbs)):
            batches = list(self._micro_batches(dataset, i * gbs, gbs))
            total += self.parallel.forward_backward(batches, 1.0, train=False)
        self.penv.all_reduce_sum(total)
        if total[1] == 0:
            return None
        return (total[0] / total[1]).item()

    # -- the run -------------------------------------------------------------------------------------------
    def _throughput(self, step_seconds: float, gbs: int) -> dict:
        m, seq = self.cfg.model, self.cfg.model.seq_length
        flops = flops_per_iteration(gbs, seq, m.num_layers, m.hidden_size, self.shape.vocab_size)
        hw_flops = flops_per_iteration(
            gbs,
            seq,
            m.num_layers,
            m.hidden_size,
            self.shape.vocab_size,
            recompute=self.cfg.parallel.recompute.value == "full",
        )
        per_device = flops / step_seconds / self.penv.world_size
        return {
            "step_time": step_seconds,
            "tokens_per_s": gbs * seq / step_seconds,
            "tokens_per_s_per_device": gbs * seq / step_seconds / self.penv.world_size,
            "tflops_per_device": per_device / 1e12,
            "hw_tflops_per_device": hw_flops / step_seconds / self.penv.world_size / 1e12,
            "mfu": per_device / self.peak,
        }

    def _should_stop(self) -> str | None:
        tr = self.cfg.train
        if tr.iters is not None and self.state.step >= tr.iters:
            return "iters"
        if tr.tokens is not None and self.state.consumed_tokens >= tr.tokens:
            return "tokens"
        at_interval = tr.exit_interval is not None and self.state.step % tr.exit_interval == 0
        if at_interval and self.state.step > self.job_first_step:
            return "exit_interval"
        # Signals and files reach ranks at different moments: the job acts on them when any rank saw one.
        elapsed = (time.monotonic() - self.start_time) / 60.0
        over_time = tr.exit_duration_minutes is not None and elapsed >= tr.exit_duration_minutes
        # Rank 0 alone looks for the kill switch: one stat per step on a shared filesystem, not one per rank.
        kill = self.penv.is_rank0 and self.stop_requests.kill_switch_on()
        local = (kill, self.stop_requests.signalled(), over_time)
        for reason, seen in zip(
            EXTERNAL_STOPS, self.penv.all_reduce_max([float(f) for f in local]), strict=True
        ):
            if seen:
                return reason
        return None

    def _save(self) -> Path:
        meta = {
            "version": __version__,
            "model": self.cfg.model.name,
            "parameters": self.num_parameters,
            "layout": {"tp": self.penv.tp, "pp": self.penv.pp, "dp": self.penv.dp},
            "dtype": self.dtype,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if self.scaler is not None:
            self.state.loss_scaler = self.scaler.state_dict()
        if self.carbon is not None:
            self.carbon.flush()
        # save() starts with a barrier: every node's carbon CSV is flushed when rank 0 sums them below.
        path = self.checkpoints.save(self.model, self.optimizer, self.state, to_yaml(self.cfg), meta)
        if self.writer is not None:
            totals = carbon_totals(self.run_dir, None, None, None)
            if totals.runs:
                self.writer.log(
                    self.record(
                        "carbon", {"energy_kwh": totals.energy_kwh, "emissions_kg": totals.emissions_kg}
                    )
                )
        return path

    def _resume(self) -> None:
        if self.cfg.train.resume == "never":
            return
        stale = self.checkpoints.clean_incomplete()
        if stale and self.penv.is_rank0:
            print(f"ignored incomplete checkpoints (interrupted saves): {', '.join(p.name for p in stale)}")
        path = self.checkpoints.latest()
        if path is None and self.cfg.train.load:
            source = resolve_checkpoint(self.cfg.train.load)
            if self.cfg.train.finetune:
                self.checkpoints.load_weights(source, self.model)
                if self.penv.is_rank0:
                    print(f"fine-tuning from the weights of {source}")
                return
            path = source
        if path is None:
            return
        self.state = self.checkpoints.load(path, self.model, self.optimizer)
        if self.scaler is not None and self.state.loss_scaler:
            self.scaler.load_state_dict(self.state.loss_scaler)
        if self.penv.is_rank0:
            print(f"resumed from {path} (step {self.state.step}, {self.state.consumed_tokens:,} tokens)")
        self._apply_rollback()

    def _refuse_to_retry_a_failure(self) -> None:
        """A process torchrun restarted in the same job (cluster.max_restarts) after the run stopped as failed
        (non-finite losses, fp16 at its floor) would resume the stuck state: it stops with the same error."""
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
            return
        last = read_last_stop(self.run_dir)
        if last is not None and last["reason"] in FAILED_STOPS:
            raise NonFiniteLossError(last["reason"], f"not retried: {last.get('error', last['reason'])}")

    def _apply_rollback(self) -> None:
        """A rollback asked for since the last job (checkpoint/rollback.py): from its step, skip to the furthest
        point the run reached and scale the learning rate."""
        request = pending_rollback(self.checkpoints.root)
        if request is None:
            return
        if request["to_step"] != self.state.step:
            raise ValueError(
                f"{self.checkpoints.root / REQUEST} asks to resume from step {request['to_step']}, but the run "
                f"resumed from step {self.state.step}: run `bigscience ckpt rollback` again, or delete the file"
            )
        before = self.state.consumed_samples
        skip = request["skip_to"]
        if skip is not None:
            self.state.step, self.state.consumed_samples, self.state.consumed_tokens = (
                skip["step"],
                skip["consumed_samples"],
                skip["consumed_tokens"],
            )
        self.state.lr_scale *= request["lr_scale"]
        applied = {
            "skipped_samples": self.state.consumed_samples - before,
            "lr_scale_now": self.state.lr_scale,
        }
        self.rollback_applied = {"to_step": request["to_step"], **applied}
        # Every rank has read the request before rank 0 clears it.
        self.penv.barrier()
        if self.penv.is_rank0:
            finish_rollback(self.run_dir, request, applied)
            print(
                f"rollback to step {request['to_step']} applied: {applied['skipped_samples']:,} samples skipped "
                f"(continuing at step {self.state.step}), LR x{self.state.lr_scale:g}"
            )

    def run(self) -> TrainResult:
        cfg, tr = self.cfg, self.cfg.train
        self._refuse_to_retry_a_failure()
        if self.penv.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        self._resume()
        # As Megatron's, exit_interval is checked after a step: a job resumed at a multiple of it trains on.
        self.job_first_step = self.state.step
        total_steps = tr.iters if tr.iters is not None else 0
        if self.penv.is_rank0:
            self.writer = MetricsWriter(
                self.run_dir, total_steps, cfg.logging, cfg.name, OmegaConf.to_container(cfg, resolve=True)
            )
            print(
                f"model {cfg.model.name}: {self.num_parameters:,} parameters; world {self.penv.world_size} "
                f"(tp={self.penv.tp} pp={self.penv.pp} dp={self.penv.dp}); {self.train_samples:,} train samples"
            )
            if self.rollback_applied is not None:
                self.writer.log(self.record("rollback", self.rollback_applied))
        first_val = last_val = None
        saved: Path | None = None
        window: list[dict] = []
        nonfinite_run = floor_run = 0
        if cfg.logging.carbon and self.penv.local_rank == 0:
            gpus = list(range(torch.cuda.device_count())) if self.penv.device.type == "cuda" else []
            self.carbon = NodeTracker(self.run_dir, cfg.cluster, cfg.logging.carbon_interval_s, gpus)
        watchdog = run_watchdog(
            tr.hang_timeout_minutes, self.run_dir, self.penv.rank, lambda: self.state.consumed_tokens
        )
        try:
            if self.state.step == 0:
                first_val = last_val = self._log_eval()
            while (reason := self._should_stop()) is None:
                if self._skip_iteration():
                    continue
                t0 = time.perf_counter()
                out = self.train_step()
                out["step_time"] = time.perf_counter() - t0
                window.append(out)
                nonfinite_run, floor_run = self._check_finite(out, nonfinite_run, floor_run)
                self._watch_for_spike(out["loss"])
                if self.state.step % cfg.logging.log_interval == 0:
                    self._log_train(window)
                    window = []
                if self.state.step % tr.eval_interval == 0:
                    last_val = self._log_eval() or last_val
                for hook in self.hooks:
                    hook(self)
                if self.state.step % cfg.checkpoint.interval == 0:
                    saved = self._save()
                if watchdog is not None:
                    watchdog.beat(self.state.step)
            if window:
                self._log_train(window)
            if reason == "signal":
                self.stop_requests.acknowledge()
            # An interrupted run saves first: its time is short, and its next job validates soon enough.
            if self.state.step % tr.eval_interval and reason in FINISHED_STOPS:
                last_val = self._log_eval() or last_val
            self.checkpoints.finish()
            latest = self.checkpoints.latest()
            # An interrupted run always saves: the next job continues from exactly here.
            must_save = cfg.checkpoint.save_final or reason not in FINISHED_STOPS
            if must_save and (latest is None or latest.name != step_dir_name(self.state.step)):
                saved = self._save()
                self.checkpoints.finish()
            saved = saved or latest
            if self.penv.is_rank0:
                write_last_stop(
                    self.run_dir,
                    reason,
                    self.state.step,
                    self.state.consumed_tokens,
                    saved.name if saved else None,
                )
            # No rank leaves before the record exists: a launcher may kill the job when the first rank exits.
            self.penv.barrier()
        except NonFiniteLossError as e:
            if self.penv.is_rank0:
                latest = self.checkpoints.latest()
                write_last_stop(
                    self.run_dir,
                    e.reason,
                    self.state.step,
                    self.state.consumed_tokens,
                    latest.name if latest else None,
                    error=str(e),
                )
            raise
        finally:
            if watchdog is not None:
                watchdog.stop()
            if self.carbon is not None:
                self.carbon.stop()
            if self.writer is not None:
                self.writer.close()
        return TrainResult(self.state, reason, first_val, last_val, saved)

    def _check_finite(self, out: dict, nonfinite_run: int, floor_run: int) -> tuple[int, int]:
        """Counts the consecutive steps no loss scale can cure, and stops the run past their limits: non-finite
        losses (any precision; in fp32 and bf16 non-finite gradients too), and in fp16 gradient overflows at
        the minimum loss scale (DeepSpeed stops there too). Skipping every step would save the stuck state to
        the end of the run, chain job after chain job."""
        tr, step = self.cfg.train, self.state.step
        nonfinite = out["skipped"] if self.scaler is None else out["nonfinite_loss"]
        nonfinite_run = nonfinite_run + 1 if nonfinite else 0
        at_floor = self.scaler is not None and out["skipped"] and not nonfinite
        floor_run = floor_run + 1 if at_floor and out["loss_scale"] <= self.scaler.min_scale else 0
        if nonfinite_run >= tr.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                "nonfinite",
                f"{nonfinite_run} consecutive steps had a non-finite loss or gradient norm "
                f"(last at step {step}); stopping",
            )
        if floor_run >= self.cfg.precision.min_scale_patience:
            raise NonFiniteLossError(
                "loss_scale_floor",
                f"{floor_run} consecutive fp16 gradient overflows at the minimum loss scale "
                f"{self.scaler.min_scale:g} (precision.min_loss_scale; last at step {step}); stopping",
            )
        return nonfinite_run, floor_run

    def _stragglers(self, busy_time: float) -> dict:
        """Every rank's mean busy time per step (its step time less its communication wait: a rank that waits
        for a slow one has a long step too) over the window, gathered at each log interval: the median and
        the slowest, named (rank, node) when it is more than logging.straggler_pct slower than the median."""
        if self.penv.world_size == 1:
            return {}
        times = self.penv.all_gather_object((busy_time, node_name()))
        median = statistics.median(t for t, _ in times)
        slowest = max(range(len(times)), key=lambda r: times[r][0])
        slow_time, node = times[slowest]
        values = {"busy_time_median": median, "busy_time_max": slow_time, "slowest_rank": slowest}
        if slow_time > median * (1 + self.cfg.logging.straggler_pct / 100):
            if self.penv.is_rank0:
                print(
                    f"straggler at step {self.state.step}: rank {slowest} on {node} is busy {slow_time:.3f} s per "
                    f"step, {100 * (slow_time / median - 1):.0f}% more than the median {median:.3f} s"
                )
            if self.writer is not None:
                record = {"rank": slowest, "node": node, "busy_time": slow_time, "median": median}
                self.writer.log(self.record("straggler", record))
        return values

    def _watch_for_spike(self, loss: float) -> None:
        """Logs a loss above logging.spike_factor x the running median (every rank sees the same loss)."""
        factor, recent = self.cfg.logging.spike_factor, self.recent_losses
        if factor is None or not math.isfinite(loss):
            return
        median = statistics.median(recent) if len(recent) >= min(10, recent.maxlen) else None
        recent.append(loss)
        if median is None or loss <= factor * median:
            return
        if self.penv.is_rank0:
            print(
                f"loss spike at step {self.state.step}: {loss:.4f} is {loss / median:.2f}x the median "
                f"{median:.4f} of the last {len(recent) - 1} steps (`bigscience ckpt rollback` goes back)"
            )
        if self.writer is not None:
            self.writer.log(self.record("spike", {"loss": loss, "median": median, "ratio": loss / median}))

    def record(self, kind: str, values: dict) -> dict:
        return {
            "kind": kind,
            "step": self.state.step,
            "consumed_samples": self.state.consumed_samples,
            "consumed_tokens": self.state.consumed_tokens,
            **values,
        }

    def _log_train(self, window: list[dict]) -> None:
        n = len(window)
        step_time = sum(w["step_time"] for w in window) / n
        values = {
            "loss": sum(w["loss"] for w in window) / n,
            "lr": window[-1]["lr"],
            "grad_norm": window[-1]["grad_norm"],
            "batch_size": window[-1]["batch_size"],
            "skipped_steps": self.state.skipped_steps,
            # Seconds per step waiting on communication nothing overlapped (parallel/comm_wait.py), and the rest
            # of the step's breakdown.
            **{k: sum(w[k] for w in window) / n for k in STEP_BREAKDOWN},
            **self._throughput(step_time, window[-1]["batch_size"]),
        }
        if self.scaler is not None:
            values["loss_scale"] = window[-1]["loss_scale"]
        if "pp_bubble" in window[-1]:
            values["pp_bubble"] = sum(w["pp_bubble"] for w in window) / n
            values["pp_bubble_theory"] = window[-1]["pp_bubble_theory"]
        values.update(self._stragglers(step_time - values["comm_wait"]))
        if self.writer is not None:
            self.writer.log(self.record("train", values))

    def _log_eval(self) -> float | None:
        values = self.evaluate()
        if values is None:
            return None
        if self.writer is not None:
            self.writer.log(self.record("valid", values))
        return values["val_loss"]
