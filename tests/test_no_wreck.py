"""No default wrecks a model: a job that sets no knob, on each trainable set, leaves the model's loss on a fixed text
it never trained on within a stated bound; and the bound is one a wrecking step size does break.

The tiny Llama (2 blocks, ~20 k numbers, random weights: its loss on any text is near ln 64 = 4.16) trains 200
default steps (the recipe: FZOO n = 8, scalar_rms, ε 1e-3, a cosine-decayed lr from the set's size) on a
memorisation task; its loss on 16 other random sequences may rise by at most BOUND. Measured 2026-12-05 on 2 CPU
cores: the final norm (at the recipe's lr 0.2) rose by 0.059 nats, every other set (held to a step 0.24 long) by at
most 0.006; the final norm's lr rule alone on every weight (lr 0.2·√(576/d) = 0.033) rose by 0.30, and lr 0.2 by
4.7. A set scaled by its pretrained RMS (``tensor_scale``) takes the final norm's step relative to its own RMS (times
(576/d)^¼), not the safe length: measured 2026-12-05, final norm +0.013, all norms +0.015, the last block +0.000, all
weights +0.002 (without the ¼ power: at most +0.039). The adapter's
own check is a server test (tests/test_adapter_server.py), where adapters live.
"""

from __future__ import annotations

import random

import pytest
from tiny_models import memorisation_task, tiny_llama

from sglang_mezo.core.config import MezoConfig, TensorScale
from sglang_mezo.core.objectives import CompletionExample, Objective, batch_loss_fn
from sglang_mezo.core.params import ParamSelection, TrainableSet
from sglang_mezo.core.recipe import RECIPE_STEP, JobDefaults, Knobs
from sglang_mezo.core.run import MezoRun
from sglang_mezo.core.scales import square_sum
from sglang_mezo.engines.hf import HFEngine
from sglang_mezo.kernels import ZKind

STEPS = 200
BOUND = 0.1
"""Nats the unrelated text's loss may rise by."""
SETS = {"final norm": None, "all norms": ParamSelection(include=(r"norm\.weight$",)),
        "last block": ParamSelection(last_layers=1), "all weights": ParamSelection()}


def unrelated_text() -> list[CompletionExample]:
    rng = random.Random(99)
    return [CompletionExample(tuple(rng.randrange(4, 64) for _ in range(6)), tuple(rng.randrange(4, 64)
                                                                                 for _ in range(6)))
            for _ in range(16)]


def rise(knobs: Knobs, tensor_scale: TensorScale = TensorScale.NONE) -> tuple[float, MezoConfig]:
    """How much STEPS steps of a job with ``knobs`` raise the loss on the unrelated text (and the job's config)."""
    model = tiny_llama(0)
    engine = HFEngine(model)
    named = dict(model.named_parameters())  # the tiny model's initial weights stand for its checkpoint
    defaults = JobDefaults(base=MezoConfig(z_kind=ZKind.RADEMACHER),
                           shapes={n: tuple(p.shape) for n, p in named.items()}, num_layers=2,
                           square_sums=lambda names: {n: square_sum(named[n]) for n in names})
    config, _ = defaults.resolve(knobs, tensor_scale=tensor_scale, total_steps=STEPS)
    params = TrainableSet.from_pieces(engine.trainable_pieces(), config.selection, 2)
    train = batch_loss_fn(engine, Objective.CROSS_ENTROPY, memorisation_task(seed=1))
    held = batch_loss_fn(engine, Objective.CROSS_ENTROPY, unrelated_text())
    before = held()
    run = MezoRun(params, config)
    for _ in range(STEPS):
        run.step(train)
    return held() - before, config


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETS))
def test_default_steps_on_each_trainable_set_hold_the_loss_on_an_unrelated_text(name):
    risen, config = rise(Knobs(selection=SETS[name]))
    assert config.lr > 0 and config.adaptive.value == "scalar_rms"  # the recipe's step, not a frozen model
    assert risen <= BOUND, f"{name}: lr {config.lr:.3g} raised the unrelated loss by {risen:.3f} nats"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETS))
def test_default_steps_on_each_set_scaled_by_its_pretrained_rms_hold_the_loss_on_an_unrelated_text(name):
    """Each tensor moves the final norm's relative step (3.9 % of its RMS a number, times (576/d)^¼): a matrix as far
    in its units as a gain."""
    risen, config = rise(Knobs(selection=SETS[name]), TensorScale.PRETRAINED_RMS)
    assert config.tensor_scales and config.lr > 0
    assert risen <= BOUND, f"{name} scaled: lr {config.lr:.3g} raised the unrelated loss by {risen:.3f} nats"


@pytest.mark.slow
def test_the_bound_catches_a_wrecking_step_size():
    """The final norm's lr rule (the step length it was measured at) on every weight: what the safe length stops."""
    numbers = sum(p.numel() for p in tiny_llama(0).parameters())
    risen, _ = rise(Knobs(selection=ParamSelection(), lr=RECIPE_STEP.lr_for(numbers)))
    assert risen > BOUND, risen
