"""fp16 dynamic loss scaling (the autocast regions are the layout's: parallel/precision.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DynamicLossScaler:
    """Megatron's DynamicGradScaler: halve after `hysteresis` overflowing steps, double after `window` clean ones.

    The caller reduces the overflow flag over every rank first, so all ranks skip the same steps.
    """

    scale: float
    window: int
    hysteresis: int
    min_scale: float
    growth_tracker: int = 0
    hysteresis_tracker: int = 0

    def __post_init__(self) -> None:
        self.hysteresis_tracker = self.hysteresis

    @classmethod
    def from_config(cls, precision_cfg) -> DynamicLossScaler:
        return cls(
            float(2**precision_cfg.initial_scale_power),
            precision_cfg.loss_scale_window,
            precision_cfg.hysteresis,
            precision_cfg.min_loss_scale,
        )

    def update(self, found_overflow: bool) -> None:
        if found_overflow:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.window:
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis
            self.scale *= 2.0

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
