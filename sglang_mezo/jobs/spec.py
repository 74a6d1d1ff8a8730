"""What a job is asked to do, validated and tokenized, and which examples each of its steps sees."""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import Example, Objective
from sglang_mezo.core.recipe import RecipeChoice
from sglang_mezo.protocol import AdapterTarget


class Purpose(str, enum.Enum):
    TRAIN = "train"
    DIAGNOSE = "diagnose"
    """The lr = 0 probes of POST /mezo/diagnose: they change nothing, and metrics leave them out."""


@dataclass(frozen=True)
class JobSpec:
    examples: tuple[Example, ...]
    objective: Objective
    config: MezoConfig
    batch_size: int
    base_model: str = ""
    eval_examples: tuple[Example, ...] = ()
    """Held-out examples evaluated before the first step, every ``eval_every`` steps and after the last."""
    eval_every: int = 0
    eval_generate: bool = False
    """Also generate for completion eval examples and report exact match and token F1."""
    purpose: Purpose = Purpose.TRAIN
    adapter: AdapterTarget | None = None
    """Train this LoRA adapter in SGLang's pool instead of the served weights."""
    recipe: RecipeChoice | None = None
    """Where the config's knobs came from (the job, the server's flags, the recipe), and why (None: not recorded)."""

    @property
    def steps(self) -> int:
        return self.config.total_steps

    def batches(self, steps: Sequence[int]) -> tuple[tuple[Example, ...], ...]:
        """The examples of each of ``steps`` (see :func:`step_batches`)."""
        picks = step_batches(len(self.examples), self.batch_size, self.config.seed, steps)
        return tuple(tuple(self.examples[i] for i in pick) for pick in picks)


def step_batches(n_examples: int, batch_size: int, seed: int, steps: Sequence[int]) -> list[list[int]]:
    """Example indices of each step: epochs of seeded shuffles, cut in consecutive batches (without replacement
    within an epoch; a batch larger than the data set takes every example)."""
    batch_size = min(batch_size, n_examples)
    per_epoch = n_examples // batch_size
    out = []
    for step in steps:
        epoch, slot = divmod(step, per_epoch)
        order = list(range(n_examples))
        random.Random(f"{seed}:{epoch}").shuffle(order)  # a string seed: stable across Python versions
        out.append(order[slot * batch_size : (slot + 1) * batch_size])
    return out
