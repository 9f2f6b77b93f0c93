"""DeepSpeed's engine as the data-parallel layout (parallel.engine=deepspeed, tp = pp = 1): ZeRO 1-3 from
parallel.dp_shard, CPU offload of the optimizer (parallel.offload=optimizer) or of the parameters too (params,
ZeRO-3), for fine-tuning big models on few GPUs. ZeRO-3 builds the model one parameter at a time
(build_module): no rank ever holds it whole.

`deepspeed_config` derives DeepSpeed's JSON from the run config; `DeepSpeedModel` gives the trainer what
`ParallelModel`, the optimizer and the fp16 loss scaler give it, mapped onto engine.backward and engine.step,
which accumulate, reduce, unscale, clip, skip on overflow and update inside DeepSpeed. Checkpoints are ours
(checkpoint/dcp.py): the whole fp32 masters and AdamW moments of each parameter, under our names, so that
they reshard and resume in our engine, and ours in DeepSpeed's.

Where the semantics differ from our engine: bf16 and fp16 train a half-precision copy of the module (its
buffers included) with fp32 masters in the optimizer, instead of fp32 weights under autocast; the fp16 loss
scale is DeepSpeed's (same settings, its own hysteresis rule); gradients are reduced in the training dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from bigscience_train.model.gpt import GPT, build_on_meta, count_parameters
from bigscience_train.model.shape import GPTShape
from bigscience_train.parallel.build import micro_batch_loss
from bigscience_train.parallel.comm_wait import CommWait
from bigscience_train.parallel.env import ParallelEnv
from bigscience_train.parallel.recompute import apply_recompute

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
# AdamW's per-parameter moments, as torch names them in its state (and so in our checkpoints).
MOMENTS = ("exp_avg", "exp_avg_sq")


def _value(choice) -> str:
    return str(getattr(choice, "value", choice))


def deepspeed_config(cfg, dp: int, device_type: str) -> dict:
    """DeepSpeed's config for the run config on `dp` ranks. The batch size is the final one, the largest: a
    ramp-up sets each step's (set_train_batch_size), which changes the gradient accumulation steps alone, while
    ZeRO's optimizer keeps the initial count to choose its accumulation buffers (more than one: accumulate)."""
    par, tr, prec = cfg.parallel, cfg.train, cfg.precision
    dtype, offload = _value(prec.dtype), _value(par.offload)
    zero: dict = {"stage": ZERO_STAGES[_value(par.dp_shard)]}
    if offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if zero["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = par.zero3_persistence_threshold
    if offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    return {
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.global_batch_size // (tr.micro_batch_size * dp),
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "fp16": {
            "enabled": dtype == "fp16",
            "loss_scale": 0,
            "initial_scale_power": prec.initial_scale_power,
            "loss_scale_window": prec.loss_scale_window,
            "hysteresis": prec.hysteresis,
            "min_loss_scale": prec.min_loss_scale,
        },
        "bf16": {"enabled": dtype == "bf16"},
        # Our AdamW (build_optimizer: Megatron's grouping) is the client optimizer, also with offload:
        # DeepSpeed's CPU Adam is a compiled op.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def init_deepspeed(device_type: str):
    """deepspeed, imported for this device and joined to the job's process group (init_parallel made it)."""
    os.environ.setdefault("DS_ACCELERATOR", device_type)
    import deepspeed
    import deepspeed.ops

    if device_type == "cpu":
        # DeepSpeed's CPU backend would compile its shared-memory op (minutes) for inference collectives alone.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        "gloo" if device_type == "cpu" else "nccl", auto_mpi_discovery=False, verbose=False
    )
    return deepspeed


def hold_places(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replaces the meta module's parameters with tensors of their shapes on `device` backed by one element
    (zero strides), for the optimizer and the names to be taken before any storage is allocated: a meta
    parameter cannot take storage in place, and the optimizer must hold the parameters DeepSpeed trains. Tied
    parameters stay one; buffers (a few values) get their storage."""
    placed: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if id(param) not in placed:
                data = torch.empty_strided(param.shape, (0,) * param.ndim, dtype=dtype, device=device)
                placed[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
            setattr(sub, name, placed[id(param)])
        for name, buffer in list(sub.named_buffers(recurse=False)):
            sub._buffers[name] = torch.empty_like(buffer, device=device)


class WholeWhileDrawn:
    """init_weights' local_part (model/init.py) for parameters hold_places placed: each gets its whole storage
    when init_weights comes to it and, with `partition` (ZeRO-3), is partitioned when init_weights moves on, so
    that a rank holds one whole parameter beyond its partitions. The tied output layer, visited after the
    embedding, draws the same values into it again, or nothing once it is partitioned (no elements here)."""

    def __init__(self, partition: Callable[[list[nn.Parameter]], None] | None):
        self.partition, self.drawing, self.allocated = partition, None, set()

    def __call__(self, param: nn.Parameter) -> tuple[torch.Tensor, tuple[int, ...]]:
        if id(param) not in self.allocated:
            self.finish()
            self.allocated.add(id(param))
            param.data = torch.empty(param.shape, dtype=param.dtype, device=param.device)
            self.drawing = param
        return param, (0,) * param.ndim

    def finish(self) -> None:
        if self.drawing is not None and self.partition is not None:
            self.partition([self.drawing])
        self.drawing = None


def build_module(
    cfg, shape: GPTShape, penv: ParallelEnv, zero_init, build_optimizer
) -> tuple[GPT, Optimizer]:
    """The model with our engine's initial values (init_weights: drawn per whole parameter), and the client
    optimizer on its parameters. With `zero_init` (ZeRO-3: a deepspeed.zero.Init of the run's config) each
    parameter is allocated in the training dtype, converted by DeepSpeed into this rank's partition (on the
    offload device of the config, pinned where it says) as soon as it has its values, and freed: a rank never
    holds more than one whole parameter beyond its partitions. Without, the whole fp32 model (ZeRO-1/2 keep
    it, and deepspeed.initialize casts it to the training dtype)."""
    module = build_on_meta(shape)
    apply_recompute(module, penv.dims.recompute)
    if cfg.train.compile:
        for block in module.transformer.h.values():
            block.compile()
    hold_places(module, penv.device, zero_init.dtype if zero_init else torch.float32)
    client = build_optimizer(module, cfg.optim, penv.device)
    # zero.Init's conversion of a whole parameter: each rank keeps its partition of rank 0's values (every
    # rank draws the same ones).
    draw = WholeWhileDrawn(zero_init._convert_to_zero_parameters if zero_init else None)
    module.init_weights(cfg.train.seed, draw)
    draw.finish()
    left = [name for name, param in module.named_parameters() if id(param) not in draw.allocated]
    if left:
        raise RuntimeError(f"init_weights gave no values to {left}")
    return module, client


class DeepSpeedLossScale:
    """The trainer's view of DeepSpeed's fp16 loss scaler: DeepSpeed updates it inside engine.step, so
    update() has nothing to do; its state converts to and from our DynamicLossScaler's."""

    def __init__(self, engine, min_scale: float):
        self.engine, self.min_scale = engine, min_scale

    @property
    def _scaler(self):
        return self.engine.optimizer.loss_scaler

    @property
    def scale(self) -> float:
        return float(self._scaler.cur_scale)

    def update(self, found_overflow: bool) -> None:
        """DeepSpeed already updated the scale from the same (dp-reduced) overflow in engine.step."""

    def state_dict(self) -> dict:
        s = self._scaler
        return {
            "scale": float(s.cur_scale),
            "growth_tracker": (s.cur_iter - s.last_overflow_iter - 1) % s.scale_window,
            "hysteresis_tracker": int(s.cur_hysteresis),
        }

    def load_state_dict(self, state: dict) -> None:
        s = self._scaler
        s.cur_scale = float(state["scale"])
        s.cur_hysteresis = int(state["hysteresis_tracker"])
        s.last_overflow_iter = s.cur_iter - 1 - int(state["growth_tracker"])


class DeepSpeedOptimizer:
    """What the trainer asks of its optimizer: the param groups it sets the LR on (DeepSpeed's step reads
    them), and a step that has already happened (DeepSpeedModel.clip_grad_norm runs engine.step)."""

    def __init__(self, engine):
        self.engine = engine

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """DeepSpeed's step leaves no gradient behind."""

    def step(self) -> None:
        """Taken in DeepSpeedModel.clip_grad_norm: DeepSpeed computes the norm inside its step."""


class DeepSpeedModel:
    """The whole model in DeepSpeed's engine, with ParallelModel's interface for the trainer."""

    def __init__(self, cfg, shape: GPTShape, penv: ParallelEnv, build_optimizer):
        if penv.tp != 1 or penv.pp != 1:
            raise ValueError(
                f"parallel.engine=deepspeed runs data parallelism alone, not tp={penv.tp} pp={penv.pp}"
            )
        tr = cfg.train
        self.penv, self.micro_batch_size = penv, tr.micro_batch_size
        self.num_parameters = count_parameters(build_on_meta(shape))
        deepspeed = init_deepspeed(penv.device.type)
        config = deepspeed_config(cfg, penv.dp, penv.device.type)
        stage = config["zero_optimization"]["stage"]
        zero_init = deepspeed.zero.Init(config_dict_or_path=config) if stage == 3 else None
        module, client = build_module(cfg, shape, penv, zero_init, build_optimizer)
        # Each parameter's whole shape and every name (a tied one has two), and its param group: DeepSpeed
        # partitions and flattens them.
        self.names = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            shape_of = getattr(param, "ds_shape", param.shape)
            self.names.setdefault(id(param), (param, shape_of, []))[2].append(name)
        self.group_of = {id(p): i for i, g in enumerate(client.param_groups) for p in g["params"]}
        self.fused_output_loss = tr.fused_output_loss
        if stage == 3 and self.fused_output_loss and module.lm_head is not None:
            # The fused output layer reads lm_head.weight in GPT.forward, outside the submodule ZeRO-3 gathers.
            deepspeed.zero.register_external_parameter(module, module.lm_head.weight)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=client, config=config)
        self.model = self
        self.optimizer = DeepSpeedOptimizer(self.engine)
        fp16 = _value(cfg.precision.dtype) == "fp16"
        self.scaler = DeepSpeedLossScale(self.engine, cfg.precision.min_loss_scale) if fp16 else None
        self.comm_wait = CommWait(penv.device)

    # -- ParallelModel's interface ------------------------------------------------------------------------
    def optimizer_aliases(self) -> dict[str, str]:
        return {}

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def bubble_theory(self, micro_batches: int) -> None:
        return None

    def forward_backward(self, batches: list[dict], loss_scale: float, train: bool) -> torch.Tensor:
        """As ParallelModel's. DeepSpeed scales the loss (fp16) and divides it by the accumulation steps,
        which the step's batch size sets (ramp-up); the last micro-batch is its accumulation boundary."""
        total = torch.zeros(3, dtype=torch.float64, device=self.penv.device)
        if train:
            self.engine.set_train_batch_size(len(batches) * self.micro_batch_size * self.penv.dp)
        for j, batch in enumerate(batches):
            if train:
                self.engine.set_gradient_accumulation_boundary(j == len(batches) - 1)
            loss_sum, count = micro_batch_loss(self.engine, batch, self.fused_output_loss)
            if train:
                self.engine.backward(loss_sum / count.clamp(min=1))
            total[:2] += torch.stack([loss_sum.detach().double(), count.double()])
        return total

    def reduce_gradients(self, loss_scale: float) -> list[nn.Parameter]:
        """DeepSpeed reduced the gradients at the boundary's backward and unscales them in its step."""
        return []

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """DeepSpeed's step (clipping to gradient_clipping = optim.clip_grad, skipping on a non-finite norm in
        every dtype, as ours) and the global norm it computed; inf where it skipped."""
        with self.comm_wait.blocking():
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if self.engine.was_step_applied() else math.inf

    # -- checkpoints: our format ----------------------------------------------------------------------------
    def _inner(self) -> torch.optim.Optimizer:
        """The torch AdamW DeepSpeed steps on its flat fp32 partitions."""
        return self.engine.optimizer.optimizer

    def full_state(self, optimizer: bool = True) -> dict:
        """{"model": whole fp32 weights, "optim": the flattened optimizer state} by our names, as
        checkpoint/dcp.py's get_state_dict gives them (its OPTIONS); every rank takes part in the gathers."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        model_sd, optim_sd = {}, {}
        inner = self._inner()
        if optimizer:
            self._link_optimizer_state()
        step = next((s["step"] for s in inner.state.values() if "step" in s), torch.tensor(0.0))
        # Before the first step (a load's template) AdamW has no state yet: zeros of the right shape.
        stepped = optimizer and any("exp_avg" in state for state in inner.state.values())
        for param, shape, names in self.names.values():
            whole = safe_get_full_fp32_param(param).detach().cpu().reshape(shape)
            moments = {k: safe_get_full_optimizer_state(param, k) if stepped else None for k in MOMENTS}
            model_sd.update(dict.fromkeys(names, whole))
            if not optimizer:
                continue
            # A tied parameter's optimizer state is under its first name, as get_state_dict gives it.
            name = names[0]
            for key, value in moments.items():
                value = torch.zeros_like(whole) if value is None else value.detach().cpu().reshape(shape)
                optim_sd[f"state.{name}.{key}"] = value
            optim_sd[f"state.{name}.step"] = step.detach().cpu().clone().float()
            group = inner.param_groups[self.group_of[id(param)]]
            optim_sd.update({f"param_groups.{name}.{k}": v for k, v in group.items() if k != "params"})
        return {"model": model_sd, "optim": optim_sd} if optimizer else {"model": model_sd}

    def set_full_state(self, state: dict) -> None:
        """Loads what full_state() gives (read from a checkpoint of either engine) into DeepSpeed's partitions.
        The LR and the other group settings come from the run config, as with our engine's resume."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        model_sd, optim_sd = state["model"], state.get("optim")
        if optim_sd is not None:
            self._init_optimizer_state(optim_sd)
        for param, _, names in self.names.values():
            name = names[0]
            safe_set_full_fp32_param(param, model_sd[name].to(self.penv.device))
            if optim_sd is not None:
                for key in MOMENTS:
                    safe_set_full_optimizer_state(
                        param, optim_sd[f"state.{name}.{key}"].to(self.penv.device), key
                    )
        self._masters_to_module()

    def _masters_to_module(self) -> None:
        """The module's weights (the training dtype's copy, each rank's partition of it with ZeRO-3) from the
        fp32 masters just set: DeepSpeed copies them only after an optimizer step."""
        zero = self.engine.optimizer
        if hasattr(zero, "update_lp_params"):
            zero.update_lp_params()
            return
        for sub_group in range(len(zero.fp32_partitioned_groups_flat)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        # Parameters under the persistence threshold stay gathered: gathered again, as after DeepSpeed's step.
        if zero.persistent_parameters:
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)

    def _init_optimizer_state(self, optim_sd: dict) -> None:
        """AdamW's state for every flat partition, at the checkpoint's step: torch creates it at the first step,
        and DeepSpeed links its per-parameter views to it then (done here, for a load before any step)."""
        inner = self._inner()
        step = float(next(v for k, v in optim_sd.items() if k.startswith("state.") and k.endswith(".step")))
        for flat, group_id in self._flat_partitions():
            group = inner.param_groups[group_id]
            on_device = group.get("fused") or group.get("capturable")
            state = inner.state[flat]
            for key in MOMENTS:
                state.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
            state["step"] = torch.tensor(
                step, dtype=torch.float32, device=flat.device if on_device else "cpu"
            )
        self._link_optimizer_state()

    def _flat_partitions(self) -> list[tuple[torch.Tensor, int]]:
        """This rank's flat fp32 partitions AdamW steps, each with its param group: ZeRO-3 splits groups into
        sub-groups and hands AdamW one at a time, ZeRO-1/2 keep one per group."""
        zero = self.engine.optimizer
        if hasattr(zero, "fp32_partitioned_groups_flat"):
            return [
                (t, zero.sub_group_to_group_id[i]) for i, t in enumerate(zero.fp32_partitioned_groups_flat)
            ]
        return [(t, i) for i, t in enumerate(zero.single_partition_of_fp32_groups)]

    def _link_optimizer_state(self) -> None:
        """ZeRO-1/2 point each parameter's view at AdamW's state once, after the first param group's first step:
        before the other groups have state (our two groups), so it is linked again here. ZeRO-3 reads the
        state directly."""
        zero = self.engine.optimizer
        if hasattr(zero, "_hp_optimizer_states_linked"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
