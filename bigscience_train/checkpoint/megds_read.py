"""Reading a Megatron-DeepSpeed checkpoint (megds_format.py): its layout, Megatron's state, and each
parameter's whole tensors, assembled on demand from every tensor-parallel rank and data-parallel partition.

Every file is read by safe_load.load_megds_file (weights_only with an allow-list), memory-mapped: a tensor is
read from disk when it is assembled, and memory holds what one parameter needs, not the checkpoint.
DeepSpeed's own readers (deepspeed.checkpoint.DeepSpeedCheckpoint, ds_to_universal) unpickle without an
allow-list, which runs whatever code a file carries, so they are not used here; the layout they
document is followed: ZeRO partitions located by their param_slice_mappings and merged over data-parallel
ranks in order, tensor-parallel slices merged by each parameter's split (megds_format.tp_split), model-
parallel rank MM = pp_rank * tp + tp_rank.

Tensors whole on every tensor-parallel rank (layernorms, row-parallel biases) are checked equal; where they
differ (BLOOM's bf16 training let them drift apart) they are averaged, as ds_to_universal does, and the
largest difference is recorded in `averaged`.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from bigscience_train.checkpoint import megds_format as fmt
from bigscience_train.checkpoint.safe_load import load_megds_file


class MegdsCheckpoint(ABC):
    """A global_stepN/ directory (regular) or a ds_to_universal output (universal): the mp_rank files' state
    and, through `tensor`, each parameter's whole tensors."""

    kind: str

    def __init__(self, path: Path):
        self.path = path
        files = sorted(p.name for p in path.iterdir() if p.is_file())
        mp = {int(m.group(1)): path / name for name in files if (m := fmt.MP_RANK_FILE.fullmatch(name))}
        if not mp:
            raise FileNotFoundError(
                f"{path} has no mp_rank_XX_model_states.pt: not a Megatron-DeepSpeed checkpoint directory "
                "(give the global_stepN/ directory itself)"
            )
        if sorted(mp) != list(range(len(mp))):
            raise FileNotFoundError(f"{path}: mp_rank files {sorted(mp)} are not 0..{len(mp) - 1}")
        self.mp_files = [mp[i] for i in range(len(mp))]
        self.files = files
        self._loaded: dict[Path, object] = {}
        self.first = self.load(self.mp_files[0])
        self.args = self.first.get("args")
        self.tp = self._tp_degree()
        if len(self.mp_files) % self.tp:
            raise ValueError(f"{path}: {len(self.mp_files)} mp_rank files for tp={self.tp}")
        self.pp = len(self.mp_files) // self.tp
        self.averaged: dict[str, float] = {}

    def load(self, path: Path):
        """A file of the checkpoint, read once (memory-mapped)."""
        if path not in self._loaded:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
            self._loaded[path] = load_megds_file(path)
        return self._loaded[path]

    def _tp_degree(self) -> int:
        dims = self.first.get("checkpoint_parallel_dimensions") or {}
        if dims.get("tp_degree"):
            return int(dims["tp_degree"])
        if self.args is not None and getattr(self.args, "tensor_model_parallel_size", None):
            return int(self.args.tensor_model_parallel_size)
        ranks = {int(m.group(2)) for name in self.files if (m := fmt.LAYER_FILE.fullmatch(name))}
        return max(len(ranks), 1)

    def mp_state(self, pp_rank: int, tp_rank: int) -> dict:
        return self.load(self.path / fmt.mp_rank_file(pp_rank, tp_rank, self.tp))

    def merge_tp(self, name: str, slices: list[torch.Tensor]) -> torch.Tensor:
        """One tensor from its tensor-parallel slices (rank order)."""
        if len(slices) == 1:
            return slices[0]
        split = fmt.tp_split(fmt.split_param_name(name)[1])
        if split is not fmt.TPSplit.replicated:
            return torch.cat(slices, dim=split.value)
        first = slices[0]
        if all(torch.equal(first, other) for other in slices[1:]):
            return first
        difference = max((other.float() - first.float()).abs().max().item() for other in slices[1:])
        self.averaged[name] = max(self.averaged.get(name, 0.0), difference)
        return (sum(s.float() for s in slices) / len(slices)).to(first.dtype)

    @abstractmethod
    def names(self) -> list[str]:
        """The parameters with optimizer state, as the PipelineModule names them, each once."""

    @abstractmethod
    def tensor(self, name: str, state: str) -> torch.Tensor:
        """A parameter's "fp32" master, "exp_avg" or "exp_avg_sq", whole."""

    @abstractmethod
    def adam_step(self, name: str) -> int:
        """How many Adam steps the parameter's moments have taken."""

    @abstractmethod
    def optimizer_common(self) -> dict:
        """The optimizer state every partition shares: loss_scaler, param_groups (their lr), clip_grad."""


class RegularCheckpoint(MegdsCheckpoint):
    """DeepSpeed's own save: layer files (the training-dtype weights) and, unless absent, the ZeRO (or bf16
    optimizer) partitions of the fp32 masters and Adam moments."""

    kind = "regular"

    def __init__(self, path: Path):
        super().__init__(path)
        self.layers = {
            (int(m.group(1)), int(m.group(2))): path / name
            for name in self.files
            if (m := fmt.LAYER_FILE.fullmatch(name))
        }
        if not self.layers:
            raise FileNotFoundError(f"{path} has no layer_XX-model_YY-model_states.pt files")
        optim: dict[int, dict[int, Path]] = {}
        for name in self.files:
            if m := fmt.OPTIM_FILE.fullmatch(name):
                optim.setdefault(int(m.group(3)), {})[int(m.group(2))] = path / name
        self.optim_files = {mp: [ranks[d] for d in sorted(ranks)] for mp, ranks in optim.items()}
        if self.optim_files and sorted(self.optim_files) != list(range(len(self.mp_files))):
            raise FileNotFoundError(
                f"{path}: optimizer partitions for mp_ranks {sorted(self.optim_files)}, expected "
                f"0..{len(self.mp_files) - 1}"
            )
        self.dp = len(self.optim_files[0]) if self.optim_files else None

    @property
    def has_optimizer(self) -> bool:
        return bool(self.optim_files)

    def _layer(self, layer: int, tp_rank: int) -> dict:
        return self.load(self.path / fmt.layer_file(layer, tp_rank))

    def _partition(self, mp_rank: int, dp_rank: int) -> dict:
        path = self.optim_files[mp_rank][dp_rank]
        state = self.load(path)["optimizer_state_dict"]
        if "param_slice_mappings" not in state:
            raise ValueError(
                f"{path} has no param_slice_mappings (a DeepSpeed before 0.6 wrote it): its partitions cannot be "
                "told apart; import the weights alone (--weights-only)"
            )
        return state

    def layer_names(self) -> list[str]:
        """Every parameter of the layer files (tp rank 0's), as the PipelineModule names them."""
        return [
            fmt.param_name(layer, key)
            for (layer, tp_rank) in sorted(self.layers)
            if tp_rank == 0
            for key in self._layer(layer, 0)
        ]

    def weight(self, name: str) -> torch.Tensor:
        """The training-dtype weight from the layer files, merged over tensor-parallel ranks."""
        layer, key = fmt.split_param_name(name)
        return self.merge_tp(name, [self._layer(layer, r)[key] for r in range(self.tp)])

    @functools.cached_property
    def _stage_of(self) -> dict[str, int]:
        """Parameter name -> the first pipeline stage whose partitions hold it (the tied embedding's copies on
        the last stage are the same parameter)."""
        stages: dict[str, int] = {}
        for pp_rank in range(self.pp):
            for dp_rank in range(self.dp):
                for mapping in self._partition(pp_rank * self.tp, dp_rank)["param_slice_mappings"]:
                    for name in mapping:
                        stages.setdefault(name, pp_rank)
        return stages

    def names(self) -> list[str]:
        return list(self._stage_of)

    def _group_of(self, mp_rank: int, name: str) -> tuple[int, int]:
        """(param group, the first data-parallel rank holding part of it)."""
        for dp_rank in range(self.dp):
            for group, mapping in enumerate(self._partition(mp_rank, dp_rank)["param_slice_mappings"]):
                if name in mapping:
                    return group, dp_rank
        raise KeyError(f"{self.path}: mp_rank {mp_rank} has no partition of {name}")

    def _shape(self, pp_rank: int, tp_rank: int, name: str) -> torch.Size:
        for shapes in self.mp_state(pp_rank, tp_rank).get("param_shapes") or []:
            if name in shapes:
                return torch.Size(shapes[name])
        # DeepSpeed's bf16 optimizer (ZeRO stage 0) records no param_shapes: the layer files have them.
        layer, key = fmt.split_param_name(name)
        return self._layer(layer, tp_rank)[key].shape

    def _slice(self, pp_rank: int, tp_rank: int, name: str, state: str) -> torch.Tensor:
        """One tensor-parallel rank's slice: its fragments from every data-parallel partition, in order."""
        mp_rank = pp_rank * self.tp + tp_rank
        group, _ = self._group_of(mp_rank, name)
        pieces = []
        for dp_rank in range(self.dp):
            part = self._partition(mp_rank, dp_rank)
            address = part["param_slice_mappings"][group].get(name)
            if address is None:
                continue
            flat = (
                part["single_partition_of_fp32_groups"][group]
                if state == "fp32"
                else _adam_state(part, group)[state]
            )
            pieces.append(flat.narrow(0, address.start, address.numel))
        shape = self._shape(pp_rank, tp_rank, name)
        joined = torch.cat(pieces)
        if joined.numel() != shape.numel():
            raise ValueError(
                f"{self.path}: the partitions of {name} (mp_rank {mp_rank}) hold {joined.numel()} values, "
                f"its shape {tuple(shape)} {shape.numel()}"
            )
        return joined.view(shape)

    def tensor(self, name: str, state: str) -> torch.Tensor:
        pp_rank = self._stage_of[name]
        return self.merge_tp(name, [self._slice(pp_rank, r, name, state) for r in range(self.tp)])

    def adam_step(self, name: str) -> int:
        mp_rank = self._stage_of[name] * self.tp
        group, dp_rank = self._group_of(mp_rank, name)
        return int(_adam_state(self._partition(mp_rank, dp_rank), group)["step"])

    def optimizer_common(self) -> dict:
        part = self._partition(0, 0)
        base = part["base_optimizer_state"]
        return {
            "loss_scaler": part.get("loss_scaler"),
            "param_groups": base["param_groups"] if isinstance(base, dict) else [],
            "clip_grad": part.get("clip_grad"),
        }


def _adam_state(partition: dict, group: int) -> dict:
    base = partition["base_optimizer_state"]
    # DeepSpeed's elastic ZeRO checkpoints keep a list of per-group states.
    return base[group] if isinstance(base, list) else base["state"][group]


class UniversalCheckpoint(MegdsCheckpoint):
    """DeepSpeed's ds_to_universal output: zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, already whole (the
    vocabulary-parallel embedding cut to the original vocabulary), and the mp_rank files."""

    kind = "universal"
    has_optimizer = True
    dp = None

    def __init__(self, path: Path):
        super().__init__(path)
        self.zero = path / fmt.UNIVERSAL_DIR
        self._names = sorted(p.name for p in self.zero.iterdir() if p.is_dir())

    def names(self) -> list[str]:
        return self._names

    def _file(self, name: str, filename: str):
        return self.load(self.zero / name / filename)

    def tensor(self, name: str, state: str) -> torch.Tensor:
        return self._file(name, fmt.UNIVERSAL_STATES[state])["param"]

    def adam_step(self, name: str) -> int:
        return int(self._file(name, "step.pt"))

    def optimizer_common(self) -> dict:
        common = self.load(self.zero / "optimizer_state.pt")
        return {
            "loss_scaler": common.get("loss_scaler"),
            "param_groups": common.get("param_groups", []),
            "clip_grad": common.get("clip_grad"),
        }


def open_checkpoint(path: str | Path) -> MegdsCheckpoint:
    """A global_stepN/ directory, or the directory DeepSpeed saved it in (its `latest` file names the tag)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    for pointer in ("latest", "latest_universal"):
        if not any(path.glob("mp_rank_*")) and (path / pointer).is_file():
            path = path / (path / pointer).read_text().strip()
    if (path / fmt.UNIVERSAL_DIR).is_dir():
        return UniversalCheckpoint(path)
    return RegularCheckpoint(path)
