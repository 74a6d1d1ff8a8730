"""What a job trains, and with which step, where neither the job nor the server's flags say: the server's recipe.

Precedence, knob by knob (``lr``, ``eps``, ``n_probes``, ``estimator``, ``adaptive``, the trainable set): the job's
own value, else the server's ``--mezo-*`` flag where the operator gave one, else the recipe. OpenAI's
``learning_rate_multiplier`` scales the lr so chosen.

The recipe (docs/learning.md has the measurements behind it):

- **What trains** (jobs on the served weights): the final norm's gain (``model.norm.weight``), unless the job or the
  flags name a set. On SmolLM2-135M that is 576 numbers, and a linear probe on the last hidden state: the set where
  SPSA's noise is smallest for what it can learn (``make bench-learning``, 2026-12-01: 70.0 % held-out at 16,000
  example-forwards from 52.5 % zero-shot). A checkpoint without that tensor trains every weight.
- **The step**: ``scalar_rms`` (lr over a running RMS of the projected gradients, so each trained number moves about
  lr a step whatever the loss's scale), ε 1e-3, one two-sided probe, and ``lr = 1e-2·√(576 / d)`` for a set of d
  numbers. At d = 576 that is the measured 1e-2. For a larger set the step's norm stays the measured recipe's,
  lr·√d = 0.24, so a default job never moves a large set further than it moves the final norm: SPSA's step is mostly
  noise outside the probed direction, and a per-number lr of 1e-2 on 14 M numbers is a random walk that wrecks the
  model (README, "Learning").
- **Adapter jobs**: ``scalar_rms``, lr 1e-3, ε 1e-2, one probe (``make bench-learning``, 2026-12-04: a rank-8 adapter
  on every module reached 72.0 % at 16,000 example-forwards).

Nothing here reads a checkpoint: the caller gives the tensors' names and shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

from .config import MezoConfig, TensorScale
from .estimators import Adaptive, Estimator
from .params import ParamSelection
from .scales import pretrained_rms_scales

FINAL_NORM = ParamSelection(include=(r"^model\.norm\.weight$",))
"""The recipe's trainable set: the decoder's final norm (Llama, Qwen2, Mistral, SmolLM2 name it so)."""
REFERENCE_NUMBERS = 576
"""d of the set the recipe's lr was measured on (SmolLM2-135M's final norm)."""
REFERENCE_LR = 1e-2
EPS = 1e-3
ADAPTER_LR = 1e-3
ADAPTER_EPS = 1e-2


@dataclass(frozen=True)
class Knobs:
    """The knobs someone set (the job, or the server's flags); None: not set."""

    lr: float | None = None
    eps: float | None = None
    n_probes: int | None = None
    estimator: Estimator | None = None
    adaptive: Adaptive | None = None
    selection: ParamSelection | None = None

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


def recipe_lr(numbers: int) -> float:
    """The recipe's lr for a set of ``numbers`` trained numbers: 1e-2 at 576, the same step norm above."""
    return REFERENCE_LR * min(1.0, math.sqrt(REFERENCE_NUMBERS / max(1, numbers)))


@dataclass(frozen=True)
class JobDefaults:
    """What a job gets for what it leaves out: the server's flags where given, else the recipe for what it trains.
    ``shapes`` are the checkpoint's tensors (name -> shape; None: unknown) and ``num_layers`` its blocks, which
    decide how many numbers a trainable set holds."""

    base: MezoConfig = MezoConfig()
    """Every other field of a job's config (z kind, seed, schedule)."""
    flags: Knobs = Knobs()
    shapes: Mapping[str, Sequence[int]] | None = None
    num_layers: int | None = None
    square_sums: Callable[[Sequence[str]], Mapping[str, tuple[float, int]]] | None = None
    """Reads (Σ t², elements) of the named checkpoint tensors, for ``tensor_scale = pretrained_rms`` (None: this
    server cannot, and such a job is refused)."""

    def resolve(self, job: Knobs = Knobs(), *, adapter: bool = False, tensor_scale: TensorScale = TensorScale.NONE,
                **fields_) -> tuple[MezoConfig, RecipeChoice]:
        """The config of a job that set ``job`` (and the other config ``fields_``), and where each knob came from;
        under ``tensor_scale`` the config holds the scales of the tensors it trains. Raises ValueError (a 400) for
        values a config refuses."""
        set_by = {**{k: "flag" for k in self.flags.given()}, **{k: "job" for k in job.given()}}
        chosen = {**self.flags.given(), **job.given()}
        numbers, lr_rule = None, ""
        if adapter:
            chosen.pop("selection", None)  # an adapter's tensors are its own
            recipe = {"lr": ADAPTER_LR, "eps": ADAPTER_EPS, "adaptive": Adaptive.SCALAR_RMS}
            name, what = "adapter", "a LoRA adapter (the adapter recipe, measured on rank-8 adapters)"
        else:
            selection = chosen.get("selection")
            if selection is None:
                selection = FINAL_NORM if self._numbers(FINAL_NORM) else ParamSelection()
            numbers = self._numbers(selection)
            recipe = {"eps": EPS, "adaptive": Adaptive.SCALAR_RMS, "selection": selection}
            name = "final-norm" if selection == FINAL_NORM else "scaled"
            what = ("the final norm's gain" if selection == FINAL_NORM else
                    f"the set named by the {set_by['selection']}" if "selection" in set_by else
                    "every weight (the checkpoint's shapes could not be read)" if self.shapes is None else
                    "every weight (no final norm found)")
            what += f" ({numbers:,} numbers)" if numbers is not None else ""
            plain = (chosen.get("adaptive", Adaptive.SCALAR_RMS) is Adaptive.NONE
                     and chosen.get("estimator", Estimator.SPSA) is Estimator.SPSA)
            if plain or not numbers:  # lr multiplies the projected gradient itself, or d is unknown: the paper's lr
                recipe["lr"] = MezoConfig.lr
                lr_rule = "the paper's plain-SGD lr"
                if not plain:
                    recipe["adaptive"] = Adaptive.NONE
            else:
                recipe["lr"] = recipe_lr(numbers)
                lr_rule = f"1e-2·√(576/{numbers})"
        recipe["estimator"] = Estimator.SPSA
        # an estimator that needs several probes gets its least number of them
        recipe["n_probes"] = Estimator(chosen.get("estimator", Estimator.SPSA)).min_probes
        sources = {k: set_by.get(k, "recipe") for k in KNOBS if not (adapter and k == "selection")}
        if all(v != "recipe" for v in sources.values()):
            name = "none"
        config = replace(self.base, **{**recipe, **chosen}, **fields_)
        if config.z_rank:
            if adapter:
                raise ValueError("z_rank shapes the served weights' matrices' directions; an adapter job trains its "
                                 "own low-rank factors")
            what += f", its matrices along rank-{config.z_rank} z"
        if TensorScale(tensor_scale) is not TensorScale.NONE:
            config = replace(config, tensor_scale=tensor_scale, tensor_scales=self._scales(config, adapter))
            what += f", each tensor moving in proportion to its RMS in the checkpoint ({config.tensor_scale.value})"
        values = {"lr": f"lr {config.lr:.3g}" + (f" = {lr_rule}" if sources["lr"] == "recipe" and lr_rule else ""),
                  "eps": f"ε {config.eps:g}", "adaptive": f"adaptive {config.adaptive.value}",
                  "estimator": config.estimator.value, "n_probes": f"{config.n_probes} probe(s)"}
        why = f"trains {what}; " + ", ".join(f"{text} ({sources[k]})" for k, text in values.items())
        return config, RecipeChoice(name, why, sources, numbers)

    def _scales(self, config: MezoConfig, adapter: bool) -> tuple[tuple[str, float], ...]:
        if adapter:
            raise ValueError("tensor_scale scales the served weights' tensors; an adapter job trains its own")
        if self.square_sums is None or self.shapes is None:
            raise ValueError("tensor_scale pretrained_rms needs the checkpoint's tensors, which this server cannot "
                             "read")
        names = config.selection.select(self.shapes, self.num_layers)
        if not names:
            raise ValueError("the trainable set matches no tensor of the checkpoint")
        return tuple(sorted(pretrained_rms_scales(self.square_sums(names)).items()))

    def _numbers(self, selection: ParamSelection) -> int | None:
        """How many numbers ``selection`` trains in this checkpoint (None: unknown; 0: none)."""
        if self.shapes is None:
            return None
        try:
            names = selection.select(self.shapes, self.num_layers)
        except ValueError:
            return None
        return sum(math.prod(self.shapes[n]) for n in names)
