"""A GPT made parallel for this process's place in the mesh: the whole model, or this rank's pipeline stages,
each built on the meta device, allocated and initialised on its own, then made recomputing, tensor-parallel,
compiled and data-parallel from outside. Training and evaluation build their models here."""

from __future__ import annotations

from dataclasses import dataclass

from bigscience_train.model import GPT, GPTShape, build_on_meta, materialize
from bigscience_train.parallel.data import apply_fsdp
from bigscience_train.parallel.env import ParallelEnv
from bigscience_train.parallel.pipeline import Pipeline, build_stage_parts, local_stage_ids, stage_layers
from bigscience_train.parallel.recompute import apply_recompute
from bigscience_train.parallel.tensor import apply_tensor_parallel


@dataclass
class ParallelModel:
    # The rank's parameters under the whole model's names (optimizer, checkpoints).
    model: GPT
    # Set when pp > 1: the stages and their schedules.
    pipeline: Pipeline | None
    # FSDP over dp (ZeRO-2/3) rather than replicas.
    fsdp: bool


def build_parallel_model(
    shape: GPTShape, par, penv: ParallelEnv, seed: int, compile_blocks: bool = False
) -> ParallelModel:
    """`par`: the config's `parallel` section."""
    fsdp = penv.dp > 1 and par.dp_shard.value != "none"
    stage_ids = local_stage_ids(penv.pp_rank, penv.pp, par.virtual_stages)
    if penv.pp > 1:
        ranges = stage_layers(shape.num_layers, penv.pp * par.virtual_stages, par.pp_count_embeddings)
        parts = build_stage_parts(shape, [ranges[i] for i in stage_ids])
    else:
        parts = [build_on_meta(shape)]
    for part in parts:
        materialize(part, penv.device, seed)
        apply_recompute(part, par.recompute.value)
        if penv.tp > 1:
            apply_tensor_parallel(part, penv.mesh["tp"], par.sequence_parallel)
        if compile_blocks:
            # In place (Module.compile): parameter names, and so checkpoints, stay the same.
            for block in part.transformer.h.values():
                block.compile()
        if fsdp:
            apply_fsdp(part, penv.mesh["dp"], par.dp_shard.value)
    if penv.pp == 1:
        return ParallelModel(parts[0], None, fsdp)
    pipeline = Pipeline(
        parts, stage_ids, penv.pp * par.virtual_stages, penv.mesh["pp"], penv.device, par.pp_schedule
    )
    return ParallelModel(pipeline.model, pipeline, fsdp)
