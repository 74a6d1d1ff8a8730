"""core.recipe: what a job gets for the knobs it leaves out, and from where (job > flag > recipe)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.estimators import Adaptive, Estimator
from sglang_mezo.core.params import ParamSelection
from sglang_mezo.core.recipe import (
    FINAL_NORM,
    ONE_PROBE_STEP,
    RECIPE_STEP,
    REFERENCE_RMS,
    SAFE_STEP_LENGTH,
    JobDefaults,
    Knobs,
    safe_lr,
)
from sglang_mezo.core.schedules import LRSchedule
from sglang_mezo.kernels import ZKind

# a SmolLM2-shaped checkpoint of two blocks (the recipe's lr was measured on its final norm, 576 numbers)
SHAPES = {"model.embed_tokens.weight": (1000, 576), "model.norm.weight": (576,),
          **{f"model.layers.{i}.{n}": s for i in range(2) for n, s in (
              ("self_attn.q_proj.weight", (576, 576)), ("mlp.down_proj.weight", (576, 1536)),
              ("input_layernorm.weight", (576,)))}}
DEFAULTS = JobDefaults(base=MezoConfig(z_kind=ZKind.RADEMACHER), shapes=SHAPES, num_layers=2)


def recipe_lr(numbers: int) -> float:
    """The recipe's lr on a set that is not the final norm: FZOO's 8 probes, a step SAFE_STEP_LENGTH long."""
    return min(RECIPE_STEP.lr_for(numbers), safe_lr(numbers, RECIPE_STEP.n_probes))


def test_a_job_that_names_nothing_trains_the_final_norm_with_the_measured_step():
    config, choice = DEFAULTS.resolve(total_steps=50, seed=3)
    assert config.selection == FINAL_NORM and config.lr == 0.2 and config.eps == 1e-3
    assert (config.adaptive, config.estimator, config.n_probes) == (Adaptive.SCALAR_RMS, Estimator.FZOO, 8)
    assert config.schedule is LRSchedule.COSINE and config.lr_at(49) == 0.0  # decays to 0 over the job's steps
    assert (config.total_steps, config.seed, config.z_kind) == (50, 3, ZKind.RADEMACHER)
    assert choice.recipe == "final-norm" and choice.trained_numbers == 576
    assert set(choice.sources.values()) == {"recipe"} and "final norm" in choice.why


def test_a_larger_set_keeps_the_recipe_s_step_norm():
    blocks = ParamSelection(last_layers=1)
    config, choice = DEFAULTS.resolve(Knobs(selection=blocks))
    d = 576 * 576 + 576 * 1536 + 576
    assert choice.recipe == "scaled" and choice.trained_numbers == d and choice.sources["selection"] == "job"
    assert config.lr == pytest.approx(0.24 * math.sqrt(8 / d)) == recipe_lr(d)
    assert config.lr * math.sqrt(d / 8) == pytest.approx(SAFE_STEP_LENGTH)  # the first recipe's step length
    assert "a step 0.24 long" in choice.why
    assert RECIPE_STEP.lr_for(10) == 0.2  # never above the measured lr
    # the final norm of a larger model keeps the step length the recipe was measured at
    wide = JobDefaults(shapes={"model.norm.weight": (2304,)}, num_layers=0)
    assert wide.resolve()[0].lr == pytest.approx(0.2 * math.sqrt(576 / 2304)) == 0.1
    # one probe named: MeZO's step, its measured lr on 576 numbers, the same length above
    config, _ = DEFAULTS.resolve(Knobs(selection=blocks, n_probes=1))
    assert config.lr == pytest.approx(1e-2 * math.sqrt(576 / d))
    # no final norm in the checkpoint: every weight, at the same step norm
    bare = JobDefaults(shapes={k: v for k, v in SHAPES.items() if k != "model.norm.weight"}, num_layers=2)
    config, choice = bare.resolve()
    assert config.selection == ParamSelection() and "every weight" in choice.why
    assert config.lr == recipe_lr(sum(math.prod(s) for s in bare.shapes.values()))


def test_the_job_beats_the_flags_and_the_flags_beat_the_recipe():
    flags = JobDefaults(flags=Knobs(lr=5e-3, eps=2e-3, selection=ParamSelection(last_layers=1)), shapes=SHAPES,
                        num_layers=2)
    config, choice = flags.resolve(Knobs(eps=1e-2))
    assert (config.lr, config.eps, config.selection) == (5e-3, 1e-2, ParamSelection(last_layers=1))
    assert choice.sources == {"lr": "flag", "eps": "job", "n_probes": "recipe", "estimator": "recipe",
                              "adaptive": "recipe", "selection": "flag", "schedule": "recipe"}
    everything = Knobs(lr=1e-4, eps=1e-3, n_probes=2, estimator=Estimator.SPSA, adaptive=Adaptive.NONE,
                       selection=ParamSelection(), schedule=LRSchedule.LINEAR)
    assert flags.resolve(everything)[1].recipe == "none"


def test_a_job_that_names_part_of_the_step_gets_the_measured_step_it_belongs_to():
    config, _ = DEFAULTS.resolve(Knobs(estimator=Estimator.FZOO))
    assert (config.n_probes, config.lr, config.schedule) == (8, 0.2, LRSchedule.COSINE)  # the recipe's own
    config, choice = DEFAULTS.resolve(Knobs(n_probes=4))  # FZOO with 4, the step as long as measured with 8
    assert (config.estimator, config.n_probes) == (Estimator.FZOO, 4) and "·√(4/8)" in choice.why
    assert config.lr == pytest.approx(0.2 * math.sqrt(4 / 8))
    for knobs in (Knobs(estimator=Estimator.SPSA), Knobs(n_probes=1)):  # MeZO's one probe, at its measured step
        config, _ = DEFAULTS.resolve(knobs)
        assert (config.estimator, config.n_probes) == (Estimator.SPSA, 1)
        assert (config.lr, config.schedule) == (ONE_PROBE_STEP.lr, LRSchedule.CONSTANT)
    config, _ = DEFAULTS.resolve(Knobs(estimator=Estimator.GREEDY))
    assert (config.n_probes, config.lr) == (2, ONE_PROBE_STEP.lr)  # greedy's least
    config, choice = DEFAULTS.resolve(Knobs(schedule=LRSchedule.CONSTANT))
    assert config.schedule is LRSchedule.CONSTANT and choice.sources["schedule"] == "job"
    assert "constant lr schedule (job)" in choice.why and config.estimator is Estimator.FZOO
    with pytest.raises(ValueError, match="fzoo"):
        DEFAULTS.resolve(Knobs(estimator=Estimator.FZOO, n_probes=1))


def test_plain_sgd_fzoo_adapters_and_unknown_shapes_get_their_own_safe_defaults():
    config, choice = DEFAULTS.resolve(Knobs(adaptive=Adaptive.NONE, estimator=Estimator.SPSA))  # lr × the gradient
    assert config.lr == MezoConfig.lr and "paper" in choice.why
    config, choice = DEFAULTS.resolve(Knobs(adaptive=Adaptive.NONE))  # FZOO normalises its step itself
    assert config.lr == 0.2 and config.estimator is Estimator.FZOO
    config, choice = DEFAULTS.resolve(Knobs(selection=ParamSelection(last_layers=1)), adapter=True)
    assert (config.lr, config.eps, config.adaptive, choice.recipe) == (1e-3, 1e-2, Adaptive.SCALAR_RMS, "adapter")
    assert (config.estimator, config.n_probes, config.schedule) == (Estimator.SPSA, 1, LRSchedule.CONSTANT)
    assert DEFAULTS.resolve(Knobs(estimator=Estimator.FZOO), adapter=True)[0].n_probes == 2  # fits the LoRA pool
    assert "selection" not in choice.sources
    config, choice = JobDefaults().resolve()  # the set's size unknown: MeZO's plain step, as before the recipe
    assert (config.lr, config.adaptive, choice.trained_numbers) == (MezoConfig.lr, Adaptive.NONE, None)
    assert (config.estimator, config.n_probes, config.schedule) == (Estimator.SPSA, 1, LRSchedule.CONSTANT)
    with pytest.raises(TypeError, match="schedule"):  # a knob passed as a plain field would bypass the recipe
        DEFAULTS.resolve(schedule=LRSchedule.LINEAR)
    with pytest.raises(ValueError):
        DEFAULTS.resolve(Knobs(eps=0.0))


def test_a_server_with_replicas_records_them_in_every_job_and_refuses_adapter_jobs():
    replicated = dataclasses.replace(DEFAULTS, base=MezoConfig(shards=2))
    assert replicated.resolve()[0].shards == 2  # the job's steps are shared between them: replay needs to know
    with pytest.raises(ValueError, match="data parallelism"):
        replicated.resolve(adapter=True)
    fleet = dataclasses.replace(DEFAULTS, adapters_off="adapter jobs do not run in a fleet yet")
    with pytest.raises(ValueError, match="in a fleet"):
        fleet.resolve(adapter=True)
    assert fleet.resolve()[0].shards == 1  # a fleet's jobs get their replicas when they start (the runner)


def test_a_job_that_scales_its_tensors_gets_each_one_s_pretrained_rms_in_its_config():
    """The scales are resolved at submission from the checkpoint's tensors (here a reader of made-up sums: gains of
    1, matrices of 0.02), for exactly the set the job trains; an adapter job or a server that cannot read its
    checkpoint is refused (a 400)."""
    read: list[str] = []

    def square_sums(names):
        read.extend(names)
        return {n: ((1.0 if SHAPES[n] == (576,) else 0.02**2) * math.prod(SHAPES[n]), math.prod(SHAPES[n]))
                for n in names}

    defaults = JobDefaults(base=MezoConfig(z_kind=ZKind.RADEMACHER), shapes=SHAPES, num_layers=2,
                           square_sums=square_sums)
    job = Knobs(selection=ParamSelection(include=(r"^model\.norm", r"layers\.1\.")))
    config, choice = defaults.resolve(job, tensor_scale="pretrained_rms")
    scales = dict(config.tensor_scales)
    assert sorted(scales) == sorted(read) == ["model.layers.1.input_layernorm.weight",
                                              "model.layers.1.mlp.down_proj.weight",
                                              "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"]
    assert scales["model.norm.weight"] / scales["model.layers.1.mlp.down_proj.weight"] == pytest.approx(50)
    # the lr is the final norm's step relative to the set's RMS: each number moves the fraction of its own tensor's
    # RMS per step that the reference's final norm's do (lr/√8 of REFERENCE_RMS), times (576/d)^¼
    d = choice.trained_numbers
    rms = math.sqrt((2 * 576 + 0.02**2 * (d - 2 * 576)) / d)
    shrink = (576 / d) ** 0.25
    assert config.lr == pytest.approx(RECIPE_STEP.lr * rms / REFERENCE_RMS * shrink)
    assert config.lr / math.sqrt(8) * scales["model.norm.weight"] / 1.0 == pytest.approx(
        RECIPE_STEP.lr / math.sqrt(8) / REFERENCE_RMS * shrink)  # a gain of RMS 1: 3.9 % of itself × (576/d)^¼
    small = Knobs(selection=FINAL_NORM)  # the reference's own size: the final norm's relative step, no more
    assert defaults.resolve(small, tensor_scale="pretrained_rms")[0].lr == pytest.approx(
        RECIPE_STEP.lr / REFERENCE_RMS)
    assert "relative to each tensor's pretrained RMS" in choice.why  # not the unscaled safe length's rule
    assert defaults.resolve(Knobs(selection=job.selection, n_probes=2), tensor_scale="pretrained_rms")[0].lr == (
        pytest.approx(config.lr / 2))  # fewer probes: the measured step's length
    assert defaults.resolve(Knobs(selection=job.selection, lr=1e-3), tensor_scale="pretrained_rms")[0].lr == 1e-3
    assert defaults.resolve(job)[0].tensor_scales == ()
    with pytest.raises(ValueError, match="adapter"):
        defaults.resolve(adapter=True, tensor_scale="pretrained_rms")
    with pytest.raises(ValueError, match="cannot read"):
        DEFAULTS.resolve(job, tensor_scale="pretrained_rms")
    with pytest.raises(ValueError, match="adapter"):
        defaults.resolve(adapter=True, z_rank=2)
    assert "rank-2" in defaults.resolve(job, z_rank=2)[1].why
