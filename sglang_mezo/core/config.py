"""The hyper-parameters of a MeZO run: one typed, validated record, saved beside every trajectory."""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field

from sglang_mezo.kernels import ZKind, check_rank, check_seed

from .estimators import Adaptive, Estimator, ScalarRMS
from .params import ParamSelection, check_scales


class TensorScale(str, enum.Enum):
    """How far each trained tensor moves, relative to the others (``tensor_scales`` holds the numbers)."""

    NONE = "none"
    """Every number moves by lr·z (MeZO): a norm's gain of ~1 as far as a matrix entry of ~0.02."""
    PRETRAINED_RMS = "pretrained_rms"
    """Tensor t moves along s_t·z, probes and updates, with s_t its root mean square in the checkpoint divided by
    the whole set's, so Σ_t n_t·s_t² = d: the step's norm is what it would be unscaled (the same lr rule holds),
    shared between tensors in proportion to their size. (The DiZO lead, arXiv 2502.03304, in its simplest form: a
    per-layer step set against the pre-trained weights; DiZO's own projections towards them are not done.)"""
from .schedules import LRSchedule, lr_at


@dataclass(frozen=True)
class MezoConfig:
    """Defaults follow the MeZO paper (ε = 1e-3, constant lr, one probe, two-sided SPSA, plain SGD steps) except lr,
    which depends on the model. ``estimator`` and ``adaptive`` choose the step's arithmetic (:mod:`.estimators`);
    ``rms_beta`` and ``rms_floor`` are the ``scalar_rms`` rule's β and ζ. Under ``fzoo`` or ``scalar_rms`` the step
    is normalised, so lr is the step's size in units of a unit-norm gradient direction rather than a multiple of
    the gradient: it wants other values than plain MeZO's."""

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
    estimator: Estimator = Estimator.SPSA
    adaptive: Adaptive = Adaptive.NONE
    rms_beta: float = 0.99
    rms_floor: float = 1e-8
    tensor_scale: TensorScale = TensorScale.NONE
    tensor_scales: tuple[tuple[str, float], ...] = ()
    """(checkpoint name, scale) for every trained tensor under ``tensor_scale``, resolved before the run starts
    (:func:`~.scales.pretrained_rms_scales`) and recorded, so that replay needs no checkpoint; empty otherwise."""
    z_rank: int = 0
    """0: dense z (MeZO); r >= 1: each trained matrix moves along a rank-r z = U·Vᵀ/√r regenerated from the seed
    (LOZO's perturbation, arXiv 2410.07698; :mod:`sglang_mezo.kernels.z_lowrank`), vectors along dense z."""
    shards: int = 1
    """1: one process scores each step's whole batch. N > 1: N data-parallel replicas each score their shard of it
    (:mod:`.shards`), take the probe off, and combine their losses before the commit, which is then a pass of its
    own (replay repeats it: the run's bits depend on it)."""

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
        if not (isinstance(self.shards, int) and self.shards >= 1):
            raise ValueError(f"shards must be an integer >= 1, got {self.shards!r}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("total_steps must be >= 1 and warmup_steps >= 0")
        check_seed(self.seed)
        object.__setattr__(self, "z_kind", ZKind(self.z_kind))
        object.__setattr__(self, "schedule", LRSchedule(self.schedule))
        object.__setattr__(self, "estimator", Estimator(self.estimator))
        object.__setattr__(self, "adaptive", Adaptive(self.adaptive))
        if self.n_probes < self.estimator.min_probes:
            raise ValueError(f"the {self.estimator.value} estimator needs n_probes >= {self.estimator.min_probes} "
                             f"(it normalises by the spread of the probe losses), got {self.n_probes}")
        ScalarRMS(self.rms_beta, self.rms_floor)  # raises on constants out of range
        object.__setattr__(self, "z_rank", check_rank(self.z_rank))
        object.__setattr__(self, "tensor_scale", TensorScale(self.tensor_scale))
        object.__setattr__(self, "tensor_scales", tuple((str(n), float(v)) for n, v in self.tensor_scales))
        if (self.tensor_scale is TensorScale.NONE) != (not self.tensor_scales):
            raise ValueError(f"tensor_scale {self.tensor_scale.value} needs its per-tensor scales resolved "
                             f"(and only it has them): got {len(self.tensor_scales)}")
        if self.tensor_scales:
            check_scales(dict(self.tensor_scales), [n for n, _ in self.tensor_scales])

    @property
    def adaptive_rule(self) -> ScalarRMS | None:
        """The step-size rule's constants, or None for plain SGD steps."""
        return ScalarRMS(self.rms_beta, self.rms_floor) if self.adaptive is Adaptive.SCALAR_RMS else None

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based ``step`` under this config's schedule."""
        return lr_at(step, lr=self.lr, schedule=self.schedule, total_steps=self.total_steps,
                     warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["z_kind"] = self.z_kind.value
        out["schedule"] = self.schedule.value
        out["estimator"] = self.estimator.value
        out["adaptive"] = self.adaptive.value
        out["selection"] = self.selection.to_dict()
        out["tensor_scale"] = self.tensor_scale.value
        out["tensor_scales"] = [list(pair) for pair in self.tensor_scales]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MezoConfig:
        data = dict(data)
        selection = data.pop("selection", None) or {}
        data["tensor_scales"] = tuple(tuple(pair) for pair in data.get("tensor_scales", ()))
        return cls(**data, selection=ParamSelection(
            include=tuple(selection.get("include", ())),
            exclude=tuple(selection.get("exclude", ())),
            last_layers=selection.get("last_layers"),
        ))
