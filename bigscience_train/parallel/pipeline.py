"""Pipeline parallelism with torch.distributed.pipelining, applied to a GPT from outside.

The model's blocks are split into pp x virtual_stages stages; stage s runs on pipeline rank s % pp (the
looped placement interleaved 1F1B expects). Each stage is a GPT trimmed with `keep_layers`, so parameter
names stay those of the whole model and checkpoints reshard across pipeline layouts by name. A rank's
stages are gathered into one `rank_model` (the same modules, not copies) for the optimizer and checkpoints.

Tied embeddings: the first stage holds the word embedding, the last the output layer, initialised equal;
after each backward both receive the sum of the two gradients (Megatron's embedding group), so they stay
equal. The gradient norm counts that weight once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._backward import stage_backward
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.tensor import DTensor, Shard

from bigscience_train.model.gpt import EMBEDDING_MODULES, GPT, build_on_meta
from bigscience_train.parallel.tensor import local_tensor

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stage_layers(num_layers: int, stages: int, count_embeddings: bool) -> list[range]:
    """Blocks per stage, evenly; with count_embeddings the embedding and the output layer each weigh one
    block (BigScience's partition type:transformer|embedding), so the first and last stage get one less."""
    units = num_layers + (2 if count_embeddings else 0)
    per_stage = units // stages
    bounds = [min(max(s * per_stage - int(count_embeddings), 0), num_layers) for s in range(stages + 1)]
    bounds[-1] = num_layers
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def local_stage_ids(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    return [pp_rank + k * pp for k in range(virtual_stages)]


def theoretical_bubble(pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of a pipeline step: (pp - 1) / (v * m + pp - 1)."""
    return (pp - 1) / (virtual_stages * micro_batches + pp - 1)


def rank_model(parts: list[GPT]) -> GPT:
    """One GPT holding every module of the rank's stages under their usual names (shared, not copied): the
    optimizer and checkpoints see the rank's parameters as one model. Never run forward."""
    if len(parts) == 1:
        return parts[0]
    whole = build_on_meta(parts[0].shape)
    t = whole.transformer
    t.h = nn.ModuleDict({name: block for part in parts for name, block in part.transformer.h.items()})
    first, last = parts[0], parts[-1]
    for name in EMBEDDING_MODULES:
        if hasattr(t, name):
            setattr(t, name, getattr(first.transformer, name))
    t.ln_f, whole.lm_head = last.transformer.ln_f, last.lm_head
    return whole


class TimedStage(PipelineStage):
    """A stage that adds up the time it computes, so that the rest of a step, the bubble, can be measured."""

    busy_seconds = 0.0
    reduce_seconds = 0.0

    def _timed(self, total: str, work: Callable, *args, **kwargs):
        """Runs work, adding its seconds (the device's, on a GPU) to the attribute named `total`."""
        start = time.perf_counter()
        try:
            return work(*args, **kwargs)
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            setattr(self, total, getattr(self, total) + time.perf_counter() - start)

    # torch's stage keeps a receive buffer per micro-batch (its activations, its gradients) for the whole
    # step and from step to step: with BLOOM's 128 micro-batches of 2 x 2048 x 14336 in bf16, 14 GiB per
    # direction. Each buffer is given its storage when its message is received and loses it once the
    # micro-batch's backward is done, so only the micro-batches in flight hold any.
    @staticmethod
    def _hold(infos, held: bool) -> None:
        for info in infos:
            if info.is_root_arg or info.buffer is None:
                continue
            storage = info.buffer.untyped_storage()
            size = info.buffer.numel() * info.buffer.element_size() if held else 0
            if storage.nbytes() != size:
                storage.resize_(size)

    def _on_meta(self, prepare, *args, **kwargs):
        """Runs one of torch's stage set-ups (private methods, same arguments), which allocates every
        micro-batch's buffers at once, with the buffers on the meta device; each is then made on this
        stage's device one at a time, without storage until its message comes."""
        device, self.device = self.device, torch.device("meta")
        try:
            result = prepare(*args, **kwargs)
        finally:
            self.device = device
        for infos in (*self.args_recv_info.values(), *self.grad_recv_info.values()):
            for info in infos:
                if not info.is_root_arg and info.buffer is not None and info.buffer.is_meta:
                    meta = info.buffer
                    info.buffer = torch.empty_strided(
                        meta.shape, meta.stride(), dtype=meta.dtype, device=device
                    )
                    self._hold((info,), False)
        return result

    def _prepare_forward_infra(self, *args, **kwargs):
        return self._on_meta(super()._prepare_forward_infra, *args, **kwargs)

    def _prepare_backward_infra(self, *args, **kwargs):
        return self._on_meta(super()._prepare_backward_infra, *args, **kwargs)

    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        self._hold(self.args_recv_info[fwd_chunk_id], True)
        return super().get_fwd_recv_ops(fwd_chunk_id)

    def get_bwd_recv_ops(self, bwd_chunk_id: int):
        if self.has_backward and not self.is_last:
            self._hold(self.grad_recv_info[bwd_chunk_id], True)
        return super().get_bwd_recv_ops(bwd_chunk_id)

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        output = self._timed("busy_seconds", super().forward_one_chunk, fwd_chunk_id, *args, **kwargs)
        if not self.has_backward:
            self._hold(self.args_recv_info[fwd_chunk_id], False)
        return output

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        result = self._timed("busy_seconds", super().backward_one_chunk, bwd_chunk_id, *args, **kwargs)
        # Schedules call it in forward-only passes too, where it does nothing.
        if self.has_backward:
            self._hold(self.args_recv_info[bwd_chunk_id], False)
            if not self.is_last:
                self._hold(self.grad_recv_info[bwd_chunk_id], False)
        return result

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        """The stage's last micro-batch runs its backward with FSDP's gradient sync on, so each unit's
        gradients are reduced as soon as autograd has them, overlapping the rest of that backward; torch's
        own stage syncs none of them until every backward of the step is done (`perform_reduce_grad`,
        which then finds nothing left to reduce and only waits)."""
        if not (last_backward and backward_type == "full" and isinstance(self.submod, FSDPModule)):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        self.submod.set_is_last_backward(True)
        self.submod.set_reshard_after_backward(True)
        self.submod.set_requires_gradient_sync(True)
        grads = stage_backward(
            bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"]
        )
        return grads, None

    def perform_reduce_grad(self, *args, **kwargs):
        # What the step still waits for of the data-parallel reduction after the last backward.
        return self._timed("reduce_seconds", super().perform_reduce_grad, *args, **kwargs)


class Pipeline:
    """The rank's stages and one schedule per micro-batch count (batch-size ramp-up changes it)."""

    def __init__(
        self,
        parts: list[GPT],
        stage_ids: list[int],
        num_stages: int,
        pp_mesh: DeviceMesh,
        device: torch.device,
        schedule: str,
        hidden_dtype: torch.dtype,
        logits_dtype: torch.dtype,
        tp_mesh: DeviceMesh | None,
    ):
        """hidden_dtype and logits_dtype: what stages send (data-parallel mixed precision casts the residual
        stream, autocast alone keeps it fp32); tp_mesh: the mesh of vocab-parallel logits, None without TP."""
        self.parts, self.stage_ids, self.num_stages = parts, stage_ids, num_stages
        self.hidden_dtype, self.logits_dtype, self.tp_mesh = hidden_dtype, logits_dtype, tp_mesh
        self.group = pp_mesh.get_group()
        self.pp = pp_mesh.size()
        self.device, self.schedule_name = device, schedule
        self.model = rank_model(parts)
        self.has_first = 0 in stage_ids
        self.has_last = num_stages - 1 in stage_ids
        self._schedules: dict[tuple[int, int, int], tuple[list[TimedStage], object]] = {}
        self._forward_schedule: ScheduleGPipe | None = None
        self.loss_fn: Callable | None = None
        # The last pass's seconds in its data-parallel gradient reduction.
        self.reduce_seconds = 0.0

    # Gradients enabled also when a stage is first built for evaluation (no_grad): it serves training after.
    @torch.enable_grad()
    def _stage_tensors(self, part: GPT, stage_id: int, micro_batch: int, seq: int) -> dict:
        """Example tensors (on the meta device) of what the stage receives and sends, so that stages are
        built static: no shape exchange over the process group, which a dry run's fake group cannot do."""

        def hidden() -> torch.Tensor:
            h, rows = part.shape.hidden_size, seq // part.sequence_shards
            # requires_grad: the stage derives from it that a gradient travels back.
            return torch.empty(
                micro_batch, rows, h, dtype=self.hidden_dtype, device="meta", requires_grad=True
            )

        first, last = stage_id == 0, stage_id == self.num_stages - 1
        inputs = torch.empty(micro_batch, seq, dtype=torch.long, device="meta") if first else hidden()
        if not last:
            return {"input_args": inputs, "output_args": hidden()}
        vocab = part.shape.vocab_size
        if self.tp_mesh is None:
            logits = torch.empty(
                micro_batch, seq, vocab, dtype=self.logits_dtype, device="meta", requires_grad=True
            )
            return {"input_args": inputs, "output_args": logits}
        local = torch.empty(
            micro_batch,
            seq,
            vocab // self.tp_mesh.size(),
            dtype=self.logits_dtype,
            device="meta",
            requires_grad=True,
        )
        logits = DTensor.from_local(local, self.tp_mesh, [Shard(-1)], run_check=False)
        # Vocab-parallel logits are a DTensor: a static stage then also needs its gradients' layouts.
        return {"input_args": inputs, "output_args": logits, "input_grads": inputs, "output_grads": logits}

    def _schedule(self, micro_batches: int, micro_batch: int, seq: int):
        key = (micro_batches, micro_batch, seq)
        if key not in self._schedules:
            stages = [
                TimedStage(
                    part,
                    sid,
                    self.num_stages,
                    self.device,
                    group=self.group,
                    **self._stage_tensors(part, sid, micro_batch, seq),
                )
                for part, sid in zip(self.parts, self.stage_ids, strict=True)
            ]
            cls = SCHEDULES[self.schedule_name]
            # The loss function already divides by the micro-batch count (as the non-pipelined loop does).
            schedule = cls(
                stages if cls is ScheduleInterleaved1F1B else stages[0],
                micro_batches,
                loss_fn=self._loss,
                scale_grads=False,
            )
            self._schedules[key] = (stages, schedule)
        return self._schedules[key]

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Set by the caller for each pass: its closure also records each micro-batch's loss and tokens.
        return self.loss_fn(output, target)

    def run(
        self,
        tokens: torch.Tensor,
        target: torch.Tensor,
        micro_batches: int,
        train: bool,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> float:
        """One pass over the batch (split into micro-batches by the schedule): forward and backward when
        training, forward only otherwise. The loss function sees each micro-batch's output on the last
        stage. Every rank passes the batch's tokens (only the first stage computes on them: the others
        read their shape). `inputs`: the model's other batch inputs (position and document ids), given to
        every stage's forward as keyword arguments, split like the tokens: each rank holds the whole batch,
        so nothing more travels between stages. Returns this rank's idle fraction of the pass."""
        stages, schedule = self._schedule(micro_batches, tokens.shape[0] // micro_batches, tokens.shape[1])
        for stage in stages:
            stage.busy_seconds = stage.reduce_seconds = 0.0
        args = (tokens,) if self.has_first else ()
        kwargs = {"target": target} if self.has_last else {}
        start = time.perf_counter()
        # The loss function records what a pass yields: kept for the schedule to return, the last stage's
        # logits of every micro-batch would stay alive to the end of the step.
        (schedule.step if train else schedule.eval)(*args, return_outputs=False, **kwargs, **(inputs or {}))
        elapsed = time.perf_counter() - start
        self.reduce_seconds = sum(s.reduce_seconds for s in stages)
        return max(0.0, 1.0 - sum(s.busy_seconds for s in stages) / elapsed)

    def forward_only(self, tokens: torch.Tensor | None) -> torch.Tensor | None:
        """The last stage's outputs (logits) for a batch, forward only, as one micro-batch (evaluation); None
        on other ranks. Every call must have the shape of the first: stages size their buffers then. One
        stage per rank (GPipe order)."""
        if len(self.parts) != 1:
            raise ValueError("forward-only passes run with one stage per rank (parallel.virtual_stages=1)")
        if self._forward_schedule is None:
            stage = PipelineStage(
                self.parts[0], self.stage_ids[0], self.num_stages, self.device, group=self.group
            )
            self._forward_schedule = ScheduleGPipe(stage, n_microbatches=1)
        outputs = self._forward_schedule.step(*((tokens,) if self.has_first else ()))
        return outputs if self.has_last else None

    def last_stage_rank(self) -> int:
        return dist.get_global_rank(self.group, (self.num_stages - 1) % self.pp)

    # -- tied embeddings ---------------------------------------------------------------------------------
    def tied_copy(self) -> nn.Parameter | None:
        """This rank's copy of the tied embedding, when the two copies live on different ranks."""
        if not self.model.shape.tie_embeddings or self.pp == 1:
            return None
        if self.has_first:
            return self.model.transformer.word_embeddings.weight
        if self.has_last:
            return self.model.lm_head.weight
        return None

    def duplicate(self) -> nn.Parameter | None:
        """The copy the gradient norm must not count a second time: the last stage's."""
        return self.tied_copy() if self.has_last and not self.has_first else None

    def optimizer_aliases(self) -> dict[str, str]:
        """The last stage's output layer is the embedding under another name: its optimizer state is saved
        under the embedding's, as a single-stage model saves it."""
        if self.duplicate() is not None:
            return {"lm_head.weight": "transformer.word_embeddings.weight"}
        return {}

    def sum_tied_grads(self) -> None:
        """First and last stage exchange their embedding gradients and both keep the sum."""
        param = self.tied_copy()
        if param is None:
            return
        grad = local_tensor(param.grad)
        peer = dist.get_global_rank(self.group, self.pp - 1 if self.has_first else 0)
        received = torch.empty_like(grad)
        ops = [
            dist.P2POp(dist.isend, grad.contiguous(), peer, self.group),
            dist.P2POp(dist.irecv, received, peer, self.group),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        grad += received
