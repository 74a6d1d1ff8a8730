"""The hyper-parameters of a MeZO run: one typed, validated record, saved beside every trajectory."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from sglang_mezo.kernels import ZKind, check_seed

from .params import ParamSelection
from .schedules import LRSchedule, lr_at


@dataclass(frozen=True)
class MezoConfig:
    """Defaults follow the MeZO paper (ε = 1e-3, constant lr, one probe) except lr, which depends on the model."""

    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    n_probes: int = 1
    z_kind: ZKind = ZKind.GAUSSIAN
    schedule: LRSchedule = LRSchedule.CONSTANT
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: int = 1000
    seed: int = 0
    selection: ParamSelection = field(default_factory=ParamSelection)

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "weight_decay", "min_lr_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.eps == 0:
            raise ValueError("eps must be > 0")
        if self.lr * self.weight_decay >= 1:
            raise ValueError(f"lr * weight_decay must be < 1 (the decay factor 1 - lr*wd must stay positive), got "
                             f"{self.lr} * {self.weight_decay}")
        if self.n_probes < 1:
            raise ValueError("n_probes must be >= 1")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("total_steps must be >= 1 and warmup_steps >= 0")
        check_seed(self.seed)
        object.__setattr__(self, "z_kind", ZKind(self.z_kind))
        object.__setattr__(self, "schedule", LRSchedule(self.schedule))

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based ``step`` under this config's schedule."""
        return lr_at(step, lr=self.lr, schedule=self.schedule, total_steps=self.total_steps,
                     warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["z_kind"] = self.z_kind.value
        out["schedule"] = self.schedule.value
        out["selection"] = self.selection.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MezoConfig:
        data = dict(data)
        selection = data.pop("selection", None) or {}
        return cls(**data, selection=ParamSelection(
            include=tuple(selection.get("include", ())),
            exclude=tuple(selection.get("exclude", ())),
            last_layers=selection.get("last_layers"),
        ))
