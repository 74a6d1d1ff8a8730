"""What a job trains, and with which step, where neither the job nor the server's flags say: the server's recipe.

Precedence, knob by knob (``lr``, ``eps``, ``n_probes``, ``estimator``, ``adaptive``, the trainable set, the lr's
``schedule``): the job's own value, else the server's ``--mezo-*`` flag where the operator gave one (no flag sets the
schedule), else the recipe. OpenAI's ``learning_rate_multiplier`` scales the lr so chosen.

The recipe (docs/learning.md has the measurements behind it):

- **What trains** (jobs on the served weights): the final norm's gain (``model.norm.weight``), unless the job or the
  flags name a set. On SmolLM2-135M that is 576 numbers, and a linear probe on the last hidden state: the set where
  a zeroth-order step's noise is smallest for what it can learn. A checkpoint without that tensor trains every
  weight.
- **The step** (:data:`RECIPE_STEP`): FZOO with 8 one-sided probes (one forward at the weights and 8 probes, 9 a
  step), ``scalar_rms``, ε 1e-3, and lr 0.2 decaying to 0 on a cosine over the job's steps (the last step applies
  nothing). Chosen with ``make sim-final-norm`` (2026-12-05), which runs a final-norm job exactly with this
  package's step on cached features: over 360 settings and then lr 0.1-0.5 at the server's batch of 16 (5 seeds,
  chosen on a validation split), FZOO n = 8 with a decaying lr learns most per example-forward, lr 0.15 to 0.3
  alike (0.2, the middle, is taken); held-out 70 % at 16,000 and 75 % at 64,000 example-forwards, against 68 % and
  71 % for the first recipe (SPSA, one probe, lr 1e-2, constant).
- **The lr and the set's size**: under ``scalar_rms`` a step of n probes on d numbers is about lr·√(d/n) long. On the
  final norm (:meth:`Step.lr_for`) the lr keeps the length it was measured at: 0.2·√(576/d)·√(n/8). Every other set
  is held to :data:`SAFE_STEP_LENGTH`, the first recipe's 0.24 (:func:`safe_lr`): gains of RMS ~1-2 take the final
  norm's length, weight matrices (RMS 0.02 in the tiny Llama, 0.13-0.29 in SmolLM2) do not (the no-wreck tests:
  tests/test_no_wreck.py).
- **A set scaled by its pretrained RMS** (a job naming ``tensor_scale: pretrained_rms``; :meth:`Step.lr_scaled`):
  every number moves a fraction of its own tensor's RMS, a gain and a matrix each in its own units: the final norm's
  under the recipe (lr/√8 of REFERENCE_RMS, 3.9 %) times (576/d)^¼. Every norm of SmolLM2 gets lr 0.0145 (the safe
  length would give 0.0036). Pilot through the server, 8,000 example-forwards on a 55-step cosine, 200 held-out
  (2026-12-05, benchmarks/pilot-scaled-norms.json): lr 0.0036 65.5 %, 0.0128 70.5 %, 0.04 70.0 %; but lr 0.04 on
  a 444-step job diverged within 50 steps (losses above ln 2, 51.7 % at 3,888): hence the ¼ power, between a
  relative step that does not shrink with d (0.04) and one of fixed relative length (0.0052).
- **A job that names another estimator, or one probe** (:data:`ONE_PROBE_STEP`): MeZO's two-sided probes at the step
  measured for one, lr ``1e-2·√(576 / d)`` constant (``make bench-learning``, 2026-12-01); greedy gets its least
  number of probes. A job naming n >= 2 probes and no estimator gets FZOO with n.
- **Where the set's size is unknown** (the checkpoint's shapes could not be read): MeZO's plain step at the paper's
  lr 1e-6, as every job got before the recipe: safe on any set.
- **Adapter jobs** (:data:`ADAPTER_STEP`): ``scalar_rms``, lr 1e-3, ε 1e-2, one SPSA probe, constant lr (``make
  bench-learning``, 2026-12-04: rank 8 on every module, 72.0 % at 16,000 example-forwards). Not FZOO's 9 forwards:
  an adapter step scores its probes as adapters in one batch, and SGLang's pool holds 8 by default.

Nothing here reads a checkpoint: the caller gives the tensors' names and shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

from .config import MezoConfig, TensorScale
from .estimators import Adaptive, Estimator
from .params import ParamSelection
from .scales import pretrained_rms_scales, set_rms
from .schedules import LRSchedule

FINAL_NORM = ParamSelection(include=(r"^model\.norm\.weight$",))
"""The recipe's trainable set: the decoder's final norm (Llama, Qwen2, Mistral, SmolLM2 name it so)."""
REFERENCE_NUMBERS = 576
"""d of the set the recipe's lr was measured on (SmolLM2-135M's final norm)."""
REFERENCE_RMS = 1.8266
"""The RMS of that set in the checkpoint (SmolLM2-135M-Instruct's final norm, as the embedded default model holds it):
what a step on a set scaled by its pretrained RMS is measured against (:meth:`Step.lr_scaled`)."""
EPS = 1e-3
ADAPTER_EPS = 1e-2


@dataclass(frozen=True)
class Step:
    """A step measured on the reference set: an estimator with its probes, its lr at d = REFERENCE_NUMBERS, and
    the lr's schedule over the job's steps."""

    estimator: Estimator
    n_probes: int
    lr: float
    schedule: LRSchedule

    def lr_for(self, numbers: int, n_probes: int | None = None) -> float:
        """The lr for the recipe's own set (the final norm) of ``numbers`` numbers and ``n_probes`` probes (None:
        this step's): the step length it was measured at, lr·√(d/n), never more than the measured lr."""
        return self.lr * min(1.0, math.sqrt(REFERENCE_NUMBERS / max(1, numbers))) * self._fewer(n_probes)

    def lr_scaled(self, rms: float, numbers: int, n_probes: int | None = None) -> float:
        """The lr for a set of ``numbers`` numbers and pretrained RMS ``rms`` whose tensors move in proportion to their
        own RMS (``tensor_scale = pretrained_rms``): each number moves, per step, the fraction of its tensor's RMS that
        the final norm's move of REFERENCE_RMS on the reference (lr/√n per number under ``scalar_rms``; 3.9 % for
        the recipe's step) times (REFERENCE_NUMBERS / numbers)^¼. Measured on every norm of SmolLM2 (35,136 numbers):
        without the factor the step diverged within 50 steps of a 444-step job; with it squared (the relative
        length held fixed, about the safe length) it learned slowest at 8,000 example-forwards. Fewer probes than
        measured keep the measured step's length; a set smaller than the reference never gets more."""
        return self.lr * rms / REFERENCE_RMS * min(1.0, (REFERENCE_NUMBERS / max(1, numbers)) ** 0.25) * self._fewer(
            n_probes)

    def _fewer(self, n_probes: int | None) -> float:
        """√(n / measured n) for fewer probes than measured (the measured step's length kept), else 1."""
        return min(1.0, math.sqrt((n_probes or self.n_probes) / self.n_probes))

    def probes(self, estimator: Estimator | None, n_probes: int | None) -> tuple[Estimator, int]:
        """The estimator and probes of a job that named ``estimator`` and ``n_probes`` (None: not named) and got
        this step: this step's probes for its own estimator, else the named estimator's least."""
        chosen = Estimator(estimator or self.estimator)
        return chosen, n_probes or (self.n_probes if chosen is self.estimator else chosen.min_probes)


SAFE_STEP_LENGTH = 1e-2 * math.sqrt(REFERENCE_NUMBERS)
"""How far a default step may move any other set (0.24): the step length of the first recipe (SPSA, one probe, lr
1e-2 on 576 numbers), under which every set of the no-wreck tests held its loss on an unrelated text. Under
``scalar_rms`` a step of n probes is about lr·√(d/n) long (each probe's unit-variance coefficient along its z,
n nearly orthogonal z's of length √d, divided by n), whatever the estimator."""


def safe_lr(numbers: int, n_probes: int) -> float:
    """The lr that makes a step of ``n_probes`` probes on ``numbers`` numbers SAFE_STEP_LENGTH long."""
    return SAFE_STEP_LENGTH * math.sqrt(n_probes / max(1, numbers))


RECIPE_STEP = Step(Estimator.FZOO, 8, 0.2, LRSchedule.COSINE)
"""What a job that names no estimator gets (``make sim-final-norm``, 2026-12-05)."""
ONE_PROBE_STEP = Step(Estimator.SPSA, 1, 1e-2, LRSchedule.CONSTANT)
"""What a job that names another estimator, or a single probe, gets (``make bench-learning``, 2026-12-01)."""
ADAPTER_STEP = Step(Estimator.SPSA, 1, 1e-3, LRSchedule.CONSTANT)
"""What an adapter job gets (``make bench-learning``, 2026-12-04); its lr does not scale with the adapter's size."""


def measured_step(estimator: Estimator | None, n_probes: int | None, *, adapter: bool = False,
                  sized: bool = True) -> Step:
    """The measured step a job gets for the estimator and probes it names (None: not named); ``sized``: whether the
    number of numbers it trains is known (else the safe one-probe step)."""
    if adapter:
        return ADAPTER_STEP
    if estimator is None:
        return ONE_PROBE_STEP if n_probes == 1 or (n_probes is None and not sized) else RECIPE_STEP
    return RECIPE_STEP if Estimator(estimator) is RECIPE_STEP.estimator else ONE_PROBE_STEP


def probes_for(estimator: Estimator | None, n_probes: int | None, *, adapter: bool = False,
               sized: bool = True) -> tuple[Estimator, int]:
    """The estimator and probes of a job that names ``estimator`` and ``n_probes`` (None: not named)."""
    return measured_step(estimator, n_probes, adapter=adapter, sized=sized).probes(estimator, n_probes)


@dataclass(frozen=True)
class Knobs:
    """The knobs someone set (the job, or the server's flags); None: not set."""

    lr: float | None = None
    eps: float | None = None
    n_probes: int | None = None
    estimator: Estimator | None = None
    adaptive: Adaptive | None = None
    selection: ParamSelection | None = None
    schedule: LRSchedule | None = None

    def given(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


KNOBS = tuple(f.name for f in fields(Knobs))


@dataclass(frozen=True)
class RecipeChoice:
    """What a job got for the knobs it left out, and why: shown in its status."""

    recipe: str
    """``final-norm`` (the recipe's set), ``scaled`` (the recipe's step on a set named by the job or the flags),
    ``adapter``, or ``none`` (the job and the flags set every knob)."""
    why: str
    sources: dict[str, str]
    """Each knob's source: ``job``, ``flag`` or ``recipe``."""
    trained_numbers: int | None = None
    """d: how many numbers the job trains (None: unknown, the checkpoint's shapes could not be read)."""

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "why": self.why, "sources": dict(self.sources),
                "trained_numbers": self.trained_numbers}


@dataclass(frozen=True)
class JobDefaults:
    """What a job gets for what it leaves out: the server's flags where given, else the recipe for what it trains.
    ``shapes`` are the checkpoint's tensors (name -> shape; None: unknown) and ``num_layers`` its blocks, which
    decide how many numbers a trainable set holds."""

    base: MezoConfig = MezoConfig()
    """Every other field of a job's config (z kind, seed, warm-up)."""
    flags: Knobs = Knobs()
    shapes: Mapping[str, Sequence[int]] | None = None
    num_layers: int | None = None
    square_sums: Callable[[Sequence[str]], Mapping[str, tuple[float, int]]] | None = None
    """Reads (Σ t², elements) of the named checkpoint tensors, for ``tensor_scale = pretrained_rms`` (None: this
    server cannot, and such a job is refused)."""
    adapters_off: str | None = None
    """Why this server refuses adapter jobs, if it does (a fleet's leader: its members' LoRA pools are not kept in
    step yet)."""

    def resolve(self, job: Knobs = Knobs(), *, adapter: bool = False, tensor_scale: TensorScale = TensorScale.NONE,
                **fields_) -> tuple[MezoConfig, RecipeChoice]:
        """The config of a job that set ``job`` (and the other config ``fields_``), and where each knob came from;
        under ``tensor_scale`` the config holds the scales of the tensors it trains. Raises ValueError (a 400) for
        values a config refuses."""
        clash = sorted(set(fields_) & set(KNOBS))
        if clash:
            raise TypeError(f"{clash} are knobs: pass them in Knobs, where the recipe can see them")
        if adapter and self.base.shards > 1:
            raise ValueError(f"adapter jobs do not run under data parallelism yet (this server has "
                             f"{self.base.shards} replicas, --dp-size): train the served weights, or use one replica")
        if adapter and self.adapters_off:
            raise ValueError(self.adapters_off)
        set_by = {**{k: "flag" for k in self.flags.given()}, **{k: "job" for k in job.given()}}
        chosen = {**self.flags.given(), **job.given()}
        numbers, lr_rule, selection = None, "", None
        if adapter:
            chosen.pop("selection", None)  # an adapter's tensors are its own
        else:
            selection = chosen.get("selection")
            if selection is None:
                selection = FINAL_NORM if self._numbers(FINAL_NORM) else ParamSelection()
            numbers = self._numbers(selection)
        scaled = TensorScale(tensor_scale) is not TensorScale.NONE
        sums = self._square_sums(selection, adapter) if scaled else None
        named = (chosen.get("estimator"), chosen.get("n_probes"))
        step = measured_step(*named, adapter=adapter, sized=bool(numbers))
        estimator, n_probes = step.probes(*named)
        recipe = {"estimator": estimator, "n_probes": n_probes, "schedule": step.schedule}
        if adapter:
            recipe |= {"lr": step.lr, "eps": ADAPTER_EPS, "adaptive": Adaptive.SCALAR_RMS}
            name, what = "adapter", "a LoRA adapter (the adapter recipe, measured on rank-8 adapters)"
        else:
            recipe |= {"eps": EPS, "adaptive": Adaptive.SCALAR_RMS, "selection": selection}
            name = "final-norm" if selection == FINAL_NORM else "scaled"
            what = ("the final norm's gain" if selection == FINAL_NORM else
                    f"the set named by the {set_by['selection']}" if "selection" in set_by else
                    "every weight (the checkpoint's shapes could not be read)" if self.shapes is None else
                    "every weight (no final norm found)")
            what += f" ({numbers:,} numbers)" if numbers is not None else ""
            plain = chosen.get("adaptive", Adaptive.SCALAR_RMS) is Adaptive.NONE and estimator is Estimator.SPSA
            if plain or not numbers:  # lr multiplies the projected gradient itself, or d is unknown: the paper's lr
                recipe["lr"] = MezoConfig.lr
                lr_rule = "the paper's plain-SGD lr"
                if not plain:
                    recipe["adaptive"] = Adaptive.NONE
            elif sums is not None:
                # each tensor moves in its own units: the final norm's relative step, a gain's and a matrix's alike
                rms = set_rms(sums)
                recipe["lr"] = step.lr_scaled(rms, numbers, n_probes)
                lr_rule = f"{step.lr:g}·{rms:.3g}/{REFERENCE_RMS}·({REFERENCE_NUMBERS}/{numbers})^¼" + (
                    f"·√({n_probes}/{step.n_probes})" if n_probes < step.n_probes else "") + (
                    ", the final norm's step relative to each tensor's pretrained RMS")
            else:
                # the set the step was measured on keeps the length it was measured at; weight matrices do not take
                # what gains near 1 take, so any other set is held to the safe length where that is shorter
                recipe["lr"] = step.lr_for(numbers, n_probes)
                lr_rule = f"{step.lr:g}·√({REFERENCE_NUMBERS}/{numbers})" + (
                    f"·√({n_probes}/{step.n_probes})" if n_probes < step.n_probes else "")
                safe = safe_lr(numbers, n_probes)
                if selection != FINAL_NORM and safe <= recipe["lr"]:
                    recipe["lr"] = safe
                    lr_rule = f"{SAFE_STEP_LENGTH:.2g}·√({n_probes}/{numbers}), a step {SAFE_STEP_LENGTH:.2g} long"
        sources = {k: set_by.get(k, "recipe") for k in KNOBS if not (adapter and k == "selection")}
        if all(v != "recipe" for v in sources.values()):
            name = "none"
        config = replace(self.base, **{**recipe, **chosen}, **fields_)
        if config.z_rank:
            if adapter:
                raise ValueError("z_rank shapes the served weights' matrices' directions; an adapter job trains its "
                                 "own low-rank factors")
            what += f", its matrices along rank-{config.z_rank} z"
        if sums is not None:
            config = replace(config, tensor_scale=tensor_scale,
                             tensor_scales=tuple(sorted(pretrained_rms_scales(sums).items())))
            what += f", each tensor moving in proportion to its RMS in the checkpoint ({config.tensor_scale.value})"
        values = {"lr": f"lr {config.lr:.3g}" + (f" = {lr_rule}" if sources["lr"] == "recipe" and lr_rule else ""),
                  "eps": f"ε {config.eps:g}", "adaptive": f"adaptive {config.adaptive.value}",
                  "estimator": config.estimator.value, "n_probes": f"{config.n_probes} probe(s)",
                  "schedule": f"{config.schedule.value} lr schedule"}
        why = f"trains {what}; " + ", ".join(f"{text} ({sources[k]})" for k, text in values.items())
        return config, RecipeChoice(name, why, sources, numbers)

    def _square_sums(self, selection: ParamSelection | None, adapter: bool) -> Mapping[str, tuple[float, int]]:
        """(Σ t², elements) in the checkpoint of each tensor ``selection`` trains: what its scales and lr come from."""
        if adapter or selection is None:
            raise ValueError("tensor_scale scales the served weights' tensors; an adapter job trains its own")
        if self.square_sums is None or self.shapes is None:
            raise ValueError("tensor_scale pretrained_rms needs the checkpoint's tensors, which this server cannot "
                             "read")
        names = selection.select(self.shapes, self.num_layers)
        if not names:
            raise ValueError("the trainable set matches no tensor of the checkpoint")
        return self.square_sums(names)

    def _numbers(self, selection: ParamSelection) -> int | None:
        """How many numbers ``selection`` trains in this checkpoint (None: unknown; 0: none)."""
        if self.shapes is None:
            return None
        try:
            names = selection.select(self.shapes, self.num_layers)
        except ValueError:
            return None
        return sum(math.prod(self.shapes[n]) for n in names)
