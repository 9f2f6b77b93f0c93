"""The job's layout, decided in one place (as torchtitan's ParallelDims): sizes, the mesh, which data-parallel
wrapping the model gets, and which loss path training takes. Plain arithmetic: the planner and the Slurm side
read it without importing torch; only `build_mesh` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bigscience_train.config.validate import data_parallel_size, padded_vocab_size
from bigscience_train.data.sampling import micro_batches_per_step
from bigscience_train.model.shape import GPTShape, shape_fields

MESH_DIMS = ("pp", "dp", "tp")


def _value(choice) -> str:
    """A config choice (an Enum or its string) as its string."""
    return str(getattr(choice, "value", choice))


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    # none: replicas; zero1 / zero2 / zero3: sharded over dp (parallel/data.py).
    dp_shard: str = "none"
    reduce_dtype: str = "fp32"
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    pp_count_embeddings: bool = False
    recompute: str = "none"

    @classmethod
    def from_config(cls, cfg, world_size: int) -> ParallelDims:
        """The run config's `parallel` section on a job of `world_size` ranks (dp: what tp x pp leave)."""
        par = cfg.parallel
        return cls(
            tp=par.tp,
            pp=par.pp,
            dp=data_parallel_size(cfg, world_size),
            dp_shard=_value(par.dp_shard),
            reduce_dtype=_value(par.reduce_dtype),
            sequence_parallel=par.sequence_parallel,
            pp_schedule=par.pp_schedule,
            virtual_stages=par.virtual_stages,
            pp_count_embeddings=par.pp_count_embeddings,
            recompute=_value(par.recompute),
        )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    @property
    def fsdp(self) -> bool:
        """Optimizer states (and with zero2 / zero3 more) sharded over dp by FSDP2 (ZeRO-1/2/3)."""
        return self.dp > 1 and self.dp_shard != "none"

    @property
    def replicas(self) -> bool:
        """Whole replicas over dp whose gradients are all-reduced."""
        return self.dp > 1 and self.dp_shard == "none"

    @property
    def vocab_parallel(self) -> bool:
        """The output layer's logits are split over the vocabulary (tensor parallelism): the loss runs under
        loss_parallel, and no rank holds whole logits."""
        return self.tp > 1

    def fused_output_loss(self, enabled: bool) -> bool:
        """Whether training takes the fused output layer and loss: not with a vocab-parallel output layer, nor
        through a pipeline (its last stage's loss takes logits)."""
        return enabled and not self.vocab_parallel and self.pp == 1

    def micro_batches(self, global_batch: int, micro_batch: int) -> int:
        return micro_batches_per_step(global_batch, micro_batch, self.dp)

    def model_shape(self, model_cfg) -> GPTShape:
        """The config's architecture with its vocabulary padded for this tp (Megatron's rule)."""
        vocab = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, self.tp)
        return dataclasses.replace(shape_fields(model_cfg), vocab_size=vocab)

    def build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=MESH_DIMS)

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp}" + (f" {self.dp_shard}" if self.fsdp else "")
