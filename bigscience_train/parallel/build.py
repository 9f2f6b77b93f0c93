"""A GPT made parallel for this process's place in the mesh, and the one interface training and evaluation run it
through. The whole model, or this rank's pipeline stages, each built on the meta device and made
tensor-parallel, recomputing, compiled and data-parallel from outside; only then is storage allocated, for
this rank's shards alone, and initialised with the values the whole model has there (model/init.py).

`ParallelModel` owns every layout-dependent step of a training step: the micro-batch loop (or the pipeline
schedule), data-parallel gradient synchronisation, the vocab-parallel loss context, the gradient reductions
FSDP does not do, and clipping. The trainer calls it the same way for every layout.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bigscience_train.model.gpt import BATCH_INPUTS, GPT, build_on_meta, count_parameters
from bigscience_train.model.shape import GPTShape
from bigscience_train.parallel.comm_wait import CommWait
from bigscience_train.parallel.data import apply_data_parallel, sync_micro_batch
from bigscience_train.parallel.env import ParallelEnv
from bigscience_train.parallel.loss import masked_lm_loss_sum
from bigscience_train.parallel.pipeline import Pipeline, local_stage_ids, stage_layers, theoretical_bubble
from bigscience_train.parallel.precision import TORCH_DTYPES, autocast
from bigscience_train.parallel.recompute import apply_recompute
from bigscience_train.parallel.tensor import (
    align_grads_with_params,
    apply_tensor_parallel,
    average_replicated_grads,
    clip_grad_norm,
    global_grad_norm,
    local_part,
    local_tensor,
    loss_context,
)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """The parameters, on the meta device, in `dtype` (no storage yet, so nothing is copied); buffers keep
    theirs (ALiBi slopes and rotary frequencies stay fp32), and tied parameters stay one."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype == dtype:
                continue
            if id(param) not in cast:
                cast[id(param)] = nn.Parameter(param.to(dtype), requires_grad=param.requires_grad)
            setattr(module, name, cast[id(param)])


def micro_batch_loss(
    model: nn.Module, batch: dict, fused_output_loss: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the masked tokens' losses, their count) of one micro-batch through a whole model. The logits
    (unfused) are local here: nothing saves them for backward, and they are freed before it runs."""
    inputs = {key: batch[key] for key in BATCH_INPUTS if key in batch}
    if fused_output_loss:
        return model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"], **inputs)
    logits = model(batch["tokens"], **inputs)
    return masked_lm_loss_sum(logits, batch["labels"], batch["loss_mask"])


class ParallelModel:
    """The rank's part of the model and how one step runs through it at this layout."""

    def __init__(
        self,
        shape: GPTShape,
        penv: ParallelEnv,
        seed: int,
        dtype: str = "fp32",
        compile_blocks: bool = False,
        fused_output_loss: bool = False,
        storage: contextlib.AbstractContextManager | None = None,
        weights_dtype: str = "fp32",
        draw_weights: bool = True,
    ):
        """storage: entered where the rank's shards are allocated and initialised (a dry run's
        FakeTensorMode); the meta model, its plans and its mesh are built outside it. weights_dtype: the
        dtype the parameters are allocated in (evaluation loads weights in its precision; training keeps
        fp32 masters). draw_weights=False: the weights' values are left unset, for a caller that loads every
        one of them next (a checkpoint's whole model: DCP refuses a partial load), so that start-up does not
        draw a model's worth of random values only to overwrite them."""
        dims = penv.dims
        self.shape, self.penv, self.dims, self.dtype = shape, penv, dims, dtype
        self.num_parameters = count_parameters(build_on_meta(shape))
        stage_ids = local_stage_ids(penv.pp_rank, dims.pp, dims.virtual_stages)
        if dims.pp > 1:
            ranges = stage_layers(shape.num_layers, dims.num_stages, dims.pp_count_embeddings)
            parts = [build_on_meta(shape).keep_layers(ranges[i]) for i in stage_ids]
        else:
            parts = [build_on_meta(shape)]
        for part in parts:
            cast_parameters(part, TORCH_DTYPES[weights_dtype])
            # Tensor parallelism first: its plan names the blocks' submodules, which recompute wraps.
            if dims.tp > 1:
                apply_tensor_parallel(part, penv.mesh["tp"], dims.sequence_parallel)
            apply_recompute(part, dims.recompute)
            if compile_blocks:
                # In place (Module.compile): parameter names, and so checkpoints, stay the same.
                for block in part.transformer.h.values():
                    block.compile()
            if dims.dp > 1:
                apply_data_parallel(part, penv.mesh["dp"], dims.dp_shard, dtype, dims.reduce_dtype)
            with storage or contextlib.nullcontext():
                part.to_empty(device=penv.device)
                if draw_weights:
                    part.init_weights(seed, local_part)
                else:
                    part.init_for_loading()
        self.pipeline: Pipeline | None = None
        if dims.pp > 1:
            half = dtype != "fp32"
            self.pipeline = Pipeline(
                parts,
                stage_ids,
                dims.num_stages,
                penv.mesh["pp"],
                penv.device,
                dims.pp_schedule,
                # Data-parallel mixed precision casts each stage's inputs; autocast alone keeps them fp32.
                hidden_dtype=TORCH_DTYPES[dtype] if half and dims.dp > 1 else torch.float32,
                logits_dtype=TORCH_DTYPES[dtype],
                tp_mesh=penv.mesh["tp"] if dims.tp > 1 else None,
            )
            # The rank's parameters under the whole model's names (optimizer, checkpoints).
            self.model: GPT = self.pipeline.model
        else:
            self.model = parts[0]
        self.fused_output_loss = dims.fused_output_loss(fused_output_loss)
        self.comm_wait = CommWait(penv.device)
        self.params = list({id(p): p for p in self.model.parameters()}.values())

    # -- what checkpoints and the optimizer need ----------------------------------------------------------
    def optimizer_aliases(self) -> dict[str, str]:
        return self.pipeline.optimizer_aliases() if self.pipeline is not None else {}

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # -- one pass over a batch ---------------------------------------------------------------------------
    def forward_backward(self, batches: list[dict], loss_scale: float, train: bool) -> torch.Tensor:
        """Runs the micro-batches (backward too when training, each loss multiplied by loss_scale and divided
        by their count); returns [loss sum, token count, pipeline idle fraction] of this rank, to be summed
        over the mesh (`penv.all_reduce_sum`)."""
        with loss_context(self.dims.vocab_parallel), autocast(self.dtype, self.penv.device):
            if self.pipeline is not None:
                return self._pipeline_pass(batches, loss_scale, train)
            return self._micro_batch_loop(batches, loss_scale, train)

    def _micro_batch_loop(self, batches: list[dict], loss_scale: float, train: bool) -> torch.Tensor:
        total = torch.zeros(3, dtype=torch.float64, device=self.penv.device)
        model = self.model
        for j, batch in enumerate(batches):
            if train and self.dims.dp > 1:
                sync_micro_batch(model, self.dims.dp_shard, last=j == len(batches) - 1)
            loss_sum, count = micro_batch_loss(model, batch, self.fused_output_loss)
            if train:
                loss = (loss_sum / count.clamp(min=1)) * (loss_scale / len(batches))
                self.comm_wait.time_backward_tail(loss)
                loss.backward()
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
        inputs = {key: torch.cat([b[key] for b in batches]) for key in BATCH_INPUTS if key in batches[0]}
        total[2] = self.pipeline.run(tokens, target, num_micro, train, inputs)
        self.comm_wait.seconds += self.pipeline.reduce_seconds
        # A new schedule's first pass also calls the loss once to infer gradient shapes: not a micro-batch.
        for record in records[-num_micro:]:
            total[:2] += record
        return total

    def bubble_theory(self, micro_batches: int) -> float | None:
        if self.pipeline is None:
            return None
        return theoretical_bubble(self.dims.pp, micro_batches, self.dims.virtual_stages)

    # -- gradients ---------------------------------------------------------------------------------------
    def reduce_gradients(self, loss_scale: float) -> list[torch.nn.Parameter]:
        """Completes this step's gradients (FSDP averaged them over dp during backward): the parameters the TP
        plan leaves whole averaged over tp, the pipeline's two copies of tied embeddings summed, and the loss
        scale divided out. Returns the parameters that have a gradient."""
        params = [p for p in self.params if p.grad is not None]
        with self.comm_wait.blocking():
            if self.dims.tp > 1:
                align_grads_with_params(params, self.penv.mesh["tp"])
                average_replicated_grads(params, self.penv.mesh["tp"])
            if self.pipeline is not None:
                self.pipeline.sum_tied_grads()
        if loss_scale != 1.0:
            torch._foreach_mul_([local_tensor(p.grad) for p in params], 1.0 / loss_scale)
        return params

    def _norm_groups(self) -> tuple:
        pipeline = self.pipeline
        return (pipeline.group, pipeline.duplicate()) if pipeline else (None, None)

    def grad_norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The global gradient norm over every rank's parameters (each counted once), as a tensor."""
        with self.comm_wait.blocking():
            return global_grad_norm(params, *self._norm_groups())

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """The global gradient norm, with the gradients clipped to max_norm."""
        with self.comm_wait.blocking():
            return clip_grad_norm(params, max_norm, *self._norm_groups())
