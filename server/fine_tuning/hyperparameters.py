"""OpenAI's fine-tuning hyper-parameters (batch size, epochs, learning-rate multiplier, DPO's beta) as a MeZO job's
steps, once the training file's size is known (README, "OpenAI fine-tuning API")."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sglang_mezo.jobs.errors import InvalidRequest
from sglang_mezo.options import Limits

from .schemas import JobCreate

AUTO_BATCH = 16
AUTO_MIN_STEPS = 100
AUTO_BETA = 0.1

@dataclass(frozen=True)
class Resolved:
    """The job's hyper-parameters once the training file's size is known."""

    batch_size: int
    n_epochs: int
    lr_multiplier: float
    beta: float | None
    steps: int


def auto(value, default):
    return default if value in (None, "auto") else value


def resolve(request: JobCreate, n_examples: int, limits: Limits) -> Resolved:
    """OpenAI's hyper-parameters as MeZO steps (README, "OpenAI fine-tuning API")."""
    given = request.given_hyperparameters()
    # a batch larger than the file takes every example; an epoch is the whole batches a shuffle holds (the runner's
    # step_batches: the remainder waits for a later epoch's shuffle)
    batch = min(int(auto(given.batch_size, AUTO_BATCH)), n_examples)
    per_epoch = n_examples // batch
    epochs = int(auto(given.n_epochs, max(1, math.ceil(AUTO_MIN_STEPS / per_epoch))))
    multiplier = float(auto(given.learning_rate_multiplier, 1.0))
    beta = float(auto(getattr(given, "beta", None), AUTO_BETA)) if request.method_type == "dpo" else None
    if batch < 1 or epochs < 1 or not multiplier > 0 or (beta is not None and not beta > 0):
        raise InvalidRequest("batch_size and n_epochs must be >= 1, learning_rate_multiplier and beta > 0")
    steps = epochs * per_epoch
    if steps > limits.max_steps_per_job:
        raise InvalidRequest(f"{epochs} epochs of {per_epoch} steps are {steps} steps, more than this server allows "
                             f"per job ({Limits.flag('max_steps_per_job')} {limits.max_steps_per_job})")
    return Resolved(batch, epochs, multiplier, beta, steps)
