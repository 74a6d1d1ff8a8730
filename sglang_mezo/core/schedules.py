"""Learning-rate schedules: constant, linear decay or cosine decay, each after an optional linear warm-up."""

from __future__ import annotations

import enum
import math


class LRSchedule(str, enum.Enum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


def lr_at(step: int, *, lr: float, schedule: LRSchedule, total_steps: int, warmup_steps: int = 0,
          min_lr_ratio: float = 0.0) -> float:
    """The learning rate of 0-based ``step`` of ``total_steps``.

    Warm-up rises linearly from lr/warmup to lr over the first ``warmup_steps`` steps; linear and cosine then decay
    from lr to ``min_lr_ratio``·lr at the last step. The MeZO paper trains with a constant rate.
    """
    if step < 0:
        raise ValueError("step must be >= 0")
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule is LRSchedule.CONSTANT:
        return lr
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule is LRSchedule.LINEAR:
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)
