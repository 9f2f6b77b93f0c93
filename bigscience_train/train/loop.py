"""The training loop: micro-batches with gradient accumulation, batch-size ramp-up, LR schedule, AdamW,
gradient clipping, mixed precision, periodic validation, checkpoints and metrics.

Parallelism enters through `ParallelEnv` (ranks, mesh) and the wrapped model; the loop itself is the same for
one process and for many.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from bigscience_train import __version__
from bigscience_train.carbon.aggregate import carbon_totals
from bigscience_train.carbon.tracker import NodeTracker
from bigscience_train.checkpoint.dcp import CheckpointManager, TrainState, step_dir_name
from bigscience_train.checkpoint.reader import resolve_checkpoint
from bigscience_train.config import to_yaml
from bigscience_train.data.gpt_data import build_splits
from bigscience_train.data.sampling import collate, micro_batch_indices
from bigscience_train.data.tokenizer import Tokenizer
from bigscience_train.fsutil import atomic_write_text
from bigscience_train.last_stop import FINISHED_STOPS, write_last_stop
from bigscience_train.metrics.flops import flops_per_iteration, peak_flops
from bigscience_train.metrics.writer import MetricsWriter
from bigscience_train.model import build_on_meta, count_parameters, shape_from_config
from bigscience_train.model.output_loss import fused_loss_applies
from bigscience_train.parallel.build import build_parallel_model
from bigscience_train.parallel.data import set_gradient_sync
from bigscience_train.parallel.env import ParallelEnv
from bigscience_train.parallel.pipeline import theoretical_bubble
from bigscience_train.parallel.tensor import (
    align_grads_with_params,
    all_reduce_flat,
    average_replicated_grads,
    clip_grad_norm,
    local_tensor,
    loss_context,
)
from bigscience_train.train.denormals import flush_denormals
from bigscience_train.train.loss import masked_lm_loss_sum
from bigscience_train.train.precision import DynamicLossScaler, autocast
from bigscience_train.train.schedules import BatchSizeSchedule, LRSchedule, total_train_samples
from bigscience_train.train.stop import StopRequests
from evaluation.run import run_tasks, write_results
from evaluation.tasks import task_specs

# Stops that interrupt a run (it continues in a later job), in order of precedence.
EXTERNAL_STOPS = ("kill_switch", "signal", "exit_duration")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    state: TrainState
    stop_reason: str
    first_val_loss: float | None
    last_val_loss: float | None
    checkpoint: Path | None


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


class Trainer:
    def __init__(self, cfg, penv: ParallelEnv):
        self.cfg, self.penv = cfg, penv
        self.run_dir = Path(cfg.run_dir)
        self.start_time = time.monotonic()
        tr = cfg.train
        self.tokenizer = Tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"data.tokenizer {cfg.data.tokenizer} has {self.tokenizer.vocab_size} tokens but "
                f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size"
            )
        self.shape = shape_from_config(cfg.model, penv.tp)
        if self.shape.attention == "flex" and penv.device.type == "cpu":
            raise ValueError(
                "model.attention=flex trains on GPUs only (torch's FlexAttention has no backward on CPU); "
                "use model.attention=sdpa"
            )
        if tr.flush_denormals:
            flush_denormals()
        seed_everything(tr.seed)
        self.num_parameters = count_parameters(build_on_meta(self.shape))
        built = build_parallel_model(self.shape, cfg.parallel, penv, tr.seed, tr.compile)
        self.model, self.pipeline, self.fsdp = built.model, built.pipeline, built.fsdp
        self.wrapped = self.model
        if penv.dp > 1 and penv.tp == 1 and penv.pp == 1 and not self.fsdp:
            self.wrapped = DistributedDataParallel(self.model, process_group=penv.dp_group())
        self.fused_output_loss = fused_loss_applies(tr.fused_output_loss, penv.tp, penv.pp)
        self.params = list({id(p): p for p in self.model.parameters()}.values())
        self.optimizer = build_optimizer(self.model, cfg.optim, penv.device)
        self.dtype = cfg.precision.dtype.value
        self.scaler = DynamicLossScaler.from_config(cfg.precision) if self.dtype == "fp16" else None

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
        self.splits = build_splits(
            cfg.data, seq, self.tokenizer, (self.train_samples, self.eval_samples, None)
        )

        self.state = TrainState()
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            penv,
            cfg.checkpoint.keep_last,
            cfg.checkpoint.keep_every,
            cfg.checkpoint.async_save,
            self.pipeline.optimizer_aliases() if self.pipeline else {},
            cfg.checkpoint.write_threads,
        )
        self.peak = peak_flops(cfg.cluster.device, self.dtype)
        self.stop_requests = StopRequests(tr.stop_signal, tr.kill_switch)
        # Resolved (and their data checked) now: a missing dataset fails before the first step.
        self.task_specs = task_specs(list(tr.eval_tasks)) if tr.eval_tasks else []
        self.writer = None
        self.carbon: NodeTracker | None = None

    # -- one optimizer step -------------------------------------------------------------------------------
    def _micro_batches(self, dataset, consumed: int, global_batch: int):
        tr = self.cfg.train
        for indices in micro_batch_indices(
            consumed, global_batch, tr.micro_batch_size, self.penv.dp_rank, self.penv.dp
        ):
            batch = collate(dataset, indices)
            yield {k: v.to(self.penv.device, non_blocking=True) for k, v in batch.items()}

    def _forward_backward(self, batches: list[dict], loss_scale: float, train: bool) -> torch.Tensor:
        """Runs the micro-batches (backward too when training); returns [loss sum, token count, pipeline
        bubble] of this rank, to be summed over the mesh."""
        if self.pipeline is not None:
            return self._pipeline_pass(batches, loss_scale, train)
        total = torch.zeros(3, dtype=torch.float64, device=self.penv.device)
        ddp = isinstance(self.wrapped, DistributedDataParallel)
        for j, batch in enumerate(batches):
            # DDP and FSDP reduce gradients only on the last micro-batch of the step.
            last = j == len(batches) - 1
            if self.fsdp and train:
                set_gradient_sync(self.model, last)
            no_sync = self.wrapped.no_sync() if ddp and train and not last else contextlib.nullcontext()
            with no_sync:
                with autocast(self.dtype, self.penv.device):
                    if self.fused_output_loss:
                        loss_sum, count = self.wrapped(
                            batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"]
                        )
                    else:
                        logits = self.wrapped(batch["tokens"])
                        loss_sum, count = masked_lm_loss_sum(logits, batch["labels"], batch["loss_mask"])
                        # Nothing saves the logits for backward: held here, they would stay alive through it.
                        del logits
                if train:
                    ((loss_sum / count.clamp(min=1)) * (loss_scale / len(batches))).backward()
            total[:2] += torch.stack([loss_sum.detach().double(), count.double()])
        return total

    def _pipeline_pass(self, batches: list[dict], loss_scale: float, train: bool) -> torch.Tensor:
        num_micro = len(batches)
        records: list[torch.Tensor] = []

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            loss_sum, count = masked_lm_loss_sum(logits, target[..., 0], target[..., 1])
            records.append(torch.stack([loss_sum.detach().double(), count.double()]))
            return (loss_sum / count.clamp(min=1)) * (loss_scale / num_micro)

        self.pipeline.loss_fn = loss_fn
        tokens = torch.cat([b["tokens"] for b in batches])
        # The schedule splits one target tensor into micro-batches: labels and loss mask travel together.
        target = torch.stack(
            [torch.cat([b["labels"] for b in batches]), torch.cat([b["loss_mask"] for b in batches]).long()],
            -1,
        )
        total = torch.zeros(3, dtype=torch.float64, device=self.penv.device)
        with autocast(self.dtype, self.penv.device):
            total[2] = self.pipeline.run(tokens, target, num_micro, train)
        # A new schedule's first pass also calls the loss once to infer gradient shapes: not a micro-batch.
        for record in records[-num_micro:]:
            total[:2] += record
        return total

    def train_step(self) -> dict:
        gbs = self.batch_schedule.at(self.state.consumed_samples)
        progress = self.state.consumed_tokens if self.lr_by_tokens else self.state.consumed_samples
        lr = self.lr_schedule.at(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.wrapped.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_scale = self.scaler.scale if self.scaler else 1.0
        batches = list(self._micro_batches(self.splits.train, self.state.consumed_samples, gbs))
        with loss_context(self.penv.tp):
            total = self._forward_backward(batches, loss_scale, train=True)
        self.penv.all_reduce_sum(total)
        loss = (total[0] / total[1].clamp(min=1)).item()

        params = [p for p in self.params if p.grad is not None]
        self._reduce_grads(params)
        if loss_scale != 1.0:
            torch._foreach_mul_([local_tensor(p.grad) for p in params], 1.0 / loss_scale)
        pipeline = self.pipeline
        grad_norm = clip_grad_norm(
            params,
            self.cfg.optim.clip_grad,
            pipeline.group if pipeline else None,
            pipeline.duplicate() if pipeline else None,
        )
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        bad = self.penv.all_reduce_max([0.0 if finite else 1.0])[0] > 0
        if self.scaler is not None:
            self.scaler.update(bad)
        if not bad:
            # An async checkpoint copies the weights and optimizer state aside while this step ran.
            self.checkpoints.wait_staged()
            self.optimizer.step()
            self.checkpoints.prepare(self.model, self.optimizer)
        self.state.step += 1
        self.state.consumed_samples += gbs
        self.state.consumed_tokens += gbs * self.cfg.model.seq_length
        self.state.skipped_steps += int(bad)
        out = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "batch_size": gbs,
            "skipped": bad,
            "loss_scale": loss_scale,
        }
        if pipeline is not None:
            out["pp_bubble"] = total[2].item() / (self.penv.pp * self.penv.dp)
            out["pp_bubble_theory"] = theoretical_bubble(
                self.penv.pp, len(batches), self.cfg.parallel.virtual_stages
            )
        return out

    def _reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Gradients DDP or FSDP do not already average: replicated ones over TP, all of them over DP when
        neither DDP nor FSDP runs; then the pipeline's two copies of tied embeddings get their sum."""
        if self.penv.tp > 1:
            align_grads_with_params(params, self.penv.mesh["tp"])
            average_replicated_grads(params, self.penv.mesh["tp"])
        plain_dp = not self.fsdp and not isinstance(self.wrapped, DistributedDataParallel)
        if self.penv.dp > 1 and plain_dp:
            all_reduce_flat([local_tensor(p.grad) for p in params], self.penv.dp_group(), self.penv.dp)
        if self.pipeline is not None:
            self.pipeline.sum_tied_grads()

    # -- validation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.splits.valid is None or self.cfg.train.eval_iters == 0:
            return None
        self.wrapped.eval()
        gbs = self.cfg.train.global_batch_size
        total = torch.zeros(3, dtype=torch.float64, device=self.penv.device)
        # The same first eval_iters batches every time, so successive validation losses compare.
        for i in range(min(self.cfg.train.eval_iters, len(self.splits.valid) // gbs)):
            batches = list(self._micro_batches(self.splits.valid, i * gbs, gbs))
            with loss_context(self.penv.tp):
                total += self._forward_backward(batches, 1.0, train=False)
        self.penv.all_reduce_sum(total)
        if total[1] == 0:
            return None
        loss = (total[0] / total[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

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
        if tr.exit_interval is not None and self.state.step > 0 and self.state.step % tr.exit_interval == 0:
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
                    self._record(
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

    def run(self) -> TrainResult:
        cfg, tr = self.cfg, self.cfg.train
        if self.penv.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        self._resume()
        total_steps = tr.iters if tr.iters is not None else 0
        if self.penv.is_rank0:
            self.writer = MetricsWriter(
                self.run_dir, total_steps, cfg.logging, cfg.name, OmegaConf.to_container(cfg, resolve=True)
            )
            print(
                f"model {cfg.model.name}: {self.num_parameters:,} parameters; world {self.penv.world_size} "
                f"(tp={self.penv.tp} pp={self.penv.pp} dp={self.penv.dp}); {self.train_samples:,} train samples"
            )
        first_val = last_val = None
        saved: Path | None = None
        window: list[dict] = []
        nonfinite_run = 0
        if cfg.logging.carbon and self.penv.local_rank == 0:
            gpus = list(range(torch.cuda.device_count())) if self.penv.device.type == "cuda" else []
            self.carbon = NodeTracker(self.run_dir, cfg.cluster, cfg.logging.carbon_interval_s, gpus)
        try:
            if self.state.step == 0:
                first_val = last_val = self._log_eval()
            while (reason := self._should_stop()) is None:
                t0 = time.perf_counter()
                out = self.train_step()
                out["step_time"] = time.perf_counter() - t0
                window.append(out)
                nonfinite_run = nonfinite_run + 1 if out["skipped"] and self.scaler is None else 0
                if nonfinite_run >= tr.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{nonfinite_run} consecutive steps had a non-finite loss or "
                        f"gradient norm (last at step {self.state.step}); stopping"
                    )
                if self.state.step % cfg.logging.log_interval == 0:
                    self._log_train(window)
                    window = []
                if self.state.step % tr.eval_interval == 0:
                    last_val = self._log_eval() or last_val
                if self.task_specs and self.state.step % tr.eval_tasks_interval == 0:
                    self._log_tasks()
                if self.state.step % cfg.checkpoint.interval == 0:
                    saved = self._save()
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
        finally:
            if self.carbon is not None:
                self.carbon.stop()
            if self.writer is not None:
                self.writer.close()
        return TrainResult(self.state, reason, first_val, last_val, saved)

    def _record(self, kind: str, values: dict) -> dict:
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
            **self._throughput(step_time, window[-1]["batch_size"]),
        }
        if self.scaler is not None:
            values["loss_scale"] = window[-1]["loss_scale"]
        if self.pipeline is not None:
            values["pp_bubble"] = sum(w["pp_bubble"] for w in window) / n
            values["pp_bubble_theory"] = window[-1]["pp_bubble_theory"]
        if self.writer is not None:
            self.writer.log(self._record("train", values))

    def _log_tasks(self) -> None:
        """Zero-shot tasks on the live model: metrics, and RUN/eval/step_N/ as `bigscience eval` writes it."""
        from evaluation.lm import BigScienceLM  # lm-eval: the [eval] extra, loaded only when asked for

        lm = BigScienceLM(self.model, self.tokenizer, self.penv, self.dtype, shard_requests=not self.fsdp)
        results = run_tasks(lm, self.task_specs, 0, self.cfg.train.eval_tasks_limit, bootstrap_iters=0)
        if self.writer is None:
            return
        values = {
            f"{task}/{key.split(',')[0]}": value
            for task, metrics in results["results"].items()
            for key, value in metrics.items()
            if isinstance(value, float) and "stderr" not in key
        }
        self.writer.log(self._record("tasks", values))
        info = {
            "run": str(self.run_dir),
            "step": self.state.step,
            "consumed_tokens": self.state.consumed_tokens,
        }
        write_results(self.run_dir / "eval" / step_dir_name(self.state.step), results, info)

    def _log_eval(self) -> float | None:
        values = self.evaluate()
        if values is None:
            return None
        if self.writer is not None:
            self.writer.log(self._record("valid", values))
        return values["val_loss"]
