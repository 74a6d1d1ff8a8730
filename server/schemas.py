"""Request and response models of the ``/mezo/*`` API (pydantic), and how each response is built from the jobs
layer's records. Validation happens here, once, before anything reaches the scheduler: bad input is a 400 whose
message names the field (see :mod:`sglang_mezo.server.errors` for every status)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sglang_mezo.core.config import TensorScale
from sglang_mezo.core.estimators import Adaptive, Estimator
from sglang_mezo.core.master import Precision
from sglang_mezo.core.objectives import EvalMetrics, Objective
from sglang_mezo.core.params import ParamSelection
from sglang_mezo.core.schedules import LRSchedule
from sglang_mezo.jobs.diagnose import EpsDiagnosis
from sglang_mezo.jobs.job import Evaluation, Job
from sglang_mezo.jobs.served import SaveReport, ServedSegment, ServedWeights
from sglang_mezo.jobs.templates import TextChoice, TextCompletion
from sglang_mezo.kernels import MAX_RANK, MAX_SEED, ZKind
from sglang_mezo.protocol import FailureKind, ReplicaFingerprint, StepReport


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CompletionExampleIn(_Strict):
    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)

    def to_text(self) -> TextCompletion:
        return TextCompletion(self.prompt, self.completion)


class ChoiceExampleIn(_Strict):
    prompt: str = Field(min_length=1)
    options: list[str] = Field(min_length=2)
    label: int = Field(ge=0)

    @model_validator(mode="after")
    def _label_is_an_option(self) -> ChoiceExampleIn:
        if self.label >= len(self.options):
            raise ValueError(f"label {self.label} is not an index of options (0..{len(self.options) - 1})")
        if any(not o for o in self.options):
            raise ValueError("options must be non-empty strings")
        return self

    def to_text(self) -> TextChoice:
        return TextChoice(self.prompt, tuple(self.options), self.label)


ExampleIn = CompletionExampleIn | ChoiceExampleIn


class ClassificationTemplateIn(_Strict):
    """MeZO-style: ``prompt`` formatted from the record, scored against one verbalizer word per class."""

    kind: Literal["classification"]
    prompt: str = Field("{text} It was", min_length=1, description="str.format over the record's fields")
    verbalizer: list[str] = Field([" terrible", " great"], min_length=2)
    label_field: str = "label"
    labels: list[str] | None = Field(None, description="the label values in class order (default: class indices)")


class MultipleChoiceTemplateIn(_Strict):
    kind: Literal["multiple_choice"]
    prompt: str = Field("{question}\nAnswer:", min_length=1)
    choices_field: str = "choices"
    option: str = Field(" {choice}", description="how each choice is written after the prompt")
    label_field: str = "answer"
    labels: list[str] | None = Field(None, description="label values naming choices 0, 1, ... (e.g. A, B, C, D)")


class GenerationTemplateIn(_Strict):
    kind: Literal["generation"]
    prompt: str = Field("{input}", min_length=1)
    completion: str = Field(" {output}", min_length=1)


TemplateIn = Annotated[ClassificationTemplateIn | MultipleChoiceTemplateIn | GenerationTemplateIn,
                       Field(discriminator="kind")]


class DatasetIn(_Strict):
    """Examples from a data file or ``datasets`` folder on the server, through a prompt template."""

    path: str = Field(min_length=1, description="JSONL, JSON, CSV, Parquet, or a datasets save_to_disk folder: "
                                                "relative to a --mezo-data-dir, or absolute inside one")
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "datasets"] = "auto"
    split: str | None = Field(None, description="the split of a saved DatasetDict")
    template: TemplateIn
    eval_size: int = Field(0, ge=0, description="held-out records: per class for classification and multiple "
                                                "choice (a balanced set), in all for generation")
    train_size: int | None = Field(None, ge=1, description="default: every record not held out")
    seed: int = Field(0, ge=0, description="the random split")


def _one_kind(examples: list[ExampleIn], field_name: str) -> None:
    if len({type(e) for e in examples}) > 1:
        raise ValueError(f"{field_name} must all be prompt/completion or all prompt/options/label")


class EvalRequest(_Strict):
    """Score examples under the served weights (as user traffic is served: nothing changes): inline ``examples``,
    or a ``dataset``'s held-out set (its ``eval_size`` per class; every record if 0)."""

    examples: list[ExampleIn] = Field(default_factory=list)
    dataset: DatasetIn | None = None
    objective: Objective | None = Field(None, description="default: cross_entropy for prompt/completion examples, "
                                                          "classification for prompt/options/label examples")
    generate: bool = Field(False, description="prompt/completion examples: also generate greedily and report "
                                              "exact match and token F1 against the completions")
    chat: bool = Field(False, description="wrap each prompt as the user's turn of the model's chat template, the "
                                          "options or completion following the assistant's turn start")

    @model_validator(mode="after")
    def _one_source(self) -> EvalRequest:
        if bool(self.examples) == (self.dataset is not None):
            raise ValueError("give either examples (at least one) or a dataset")
        _one_kind(self.examples, "examples")
        return self


class EvalOut(BaseModel):
    n: int
    loss: float
    """The objective's mean loss over the examples."""
    accuracy: float | None = None
    """For prompt/options/label examples: the share whose most likely option (length-normalised) is the label."""
    exact_match: float | None = None
    """With generation: the share of greedy generations equal to the completion (SQuAD-normalised)."""
    f1: float | None = None
    """With generation: the mean token F1 of the greedy generations against the completions (SQuAD's)."""
    weight_version: str
    """The weights that were evaluated (see GET /mezo/weights)."""

    @classmethod
    def of(cls, metrics: EvalMetrics, weight_version: str, **extra) -> Self:
        return cls(**dataclasses.asdict(metrics), weight_version=weight_version, **extra)


class JobEvalOut(EvalOut):
    step: int
    """Committed steps of the job when the evaluation ran (0: before the first)."""

    @classmethod
    def of_evaluation(cls, evaluation: Evaluation) -> JobEvalOut:
        return cls.of(evaluation.metrics, evaluation.weight_version, step=evaluation.step)


class AdapterShapeIn(_Strict):
    """What a LoRA adapter trained in SGLang's pool is (the server needs ``--enable-lora``)."""

    rank: int | None = Field(None, ge=1, description="default: --max-lora-rank")
    alpha: float | None = Field(None, gt=0, description="PEFT's lora_alpha (the forward adds alpha/rank·BAx); "
                                                        "default: 2·rank")
    target_modules: list[str] | None = Field(None, min_length=1, description="default: --lora-target-modules")
    probes_in_one_batch: bool = Field(True, description="false: score each probe adapter in a forward of its own "
                                                        "(slower; for comparison)")
    start_from: str | None = Field(None, min_length=1, max_length=256,
                                   description="start from this served adapter's weights instead of a fresh adapter: "
                                               "one this server trained (its served version) or one SGLang loaded "
                                               "(--lora-paths, /load_lora_adapter); rank, alpha and target_modules "
                                               "default to its own, and must equal them")


class AdapterIn(AdapterShapeIn):
    """Train a LoRA adapter in SGLang's LoRA pool instead of the served weights. The adapter is served by ``name``
    (``/generate``'s ``lora_path``, OpenAI's ``model: "<base>:<name>"``) from its first committed chunk on; the
    base keeps serving unchanged."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="letters, digits, '.', '_', '-' (no ':': SGLang splits model names there)")


class TrainSetIn(BaseModel):
    """What a job trains, where it chooses (default: the server's ``--mezo-train`` / ``--mezo-last-layers``, else
    the recipe's set), and how far each of those tensors moves against the others."""

    train: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, min_length=1, max_length=32, description=(
            "regular expressions searched in the checkpoint's tensor names: the job trains those that match one "
            "(with last_layers: of those blocks); default: the server's --mezo-train / --mezo-last-layers"))
    last_layers: int | None = Field(None, ge=1, description="the job trains the last K transformer blocks only")
    tensor_scale: TensorScale | None = Field(None, description=(
        "none: every trained number moves by lr·z; pretrained_rms: each tensor moves in proportion to its root "
        "mean square in the checkpoint (a norm's gain of ~1 fifty times as far as a matrix entry of ~0.02), the "
        "step's norm unchanged; with no lr named, the recipe's lr moves each number the final norm's fraction of "
        "its tensor's RMS (3.9 %) times (576/d)^¼ for a set of d numbers"))

    z_rank: int | None = Field(None, ge=0, le=MAX_RANK, description=(
        "0: dense z (MeZO); r >= 1: each trained matrix moves along a rank-r z = U·Vᵀ/√r regenerated from the seed "
        "(LOZO), vectors along dense z"))

    @field_validator("train")
    @classmethod
    def _patterns_compile(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or ():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns

    @property
    def selection(self) -> ParamSelection | None:
        """The weights this job trains, where it chooses them (None: the server's)."""
        if self.train is None and self.last_layers is None:
            return None
        return ParamSelection(include=tuple(self.train or ()), last_layers=self.last_layers)


class StepRequest(TrainSetIn, _Strict):
    """A training job. Hyper-parameters left out take the server's ``--mezo-*`` defaults."""

    examples: list[ExampleIn] = Field(default_factory=list)
    dataset: DatasetIn | None = Field(None, description="instead of examples: a data file on the server; its "
                                                        "held-out set becomes eval_examples")
    objective: Objective | None = Field(None, description="default: cross_entropy for prompt/completion examples, "
                                                          "classification for prompt/options/label examples")
    eval_examples: list[ExampleIn] = Field(default_factory=list,
                                           description="held-out examples of the same kind, evaluated before the "
                                                       "first step, every eval_every steps and at the end")
    eval_every: int = Field(0, ge=0, description="0: evaluate only before and after training")
    eval_generate: bool = Field(False, description="prompt/completion eval examples: also report exact match and "
                                                   "token F1 of greedy generations")
    steps: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float | None = Field(None, ge=0, le=1.0)
    eps: float | None = Field(None, gt=0, le=0.1, description="a perturbation beyond 0.1 destroys fp32 weights")
    n_probes: int | None = Field(None, ge=1, description="at most --mezo-max-probes")
    z_kind: ZKind | None = None
    estimator: Estimator | None = Field(None, description="spsa: MeZO's two-sided probes (2n forwards a step); "
                                                          "fzoo: one forward at the weights and n one-sided "
                                                          "probes, normalised by their spread (n + 1; n >= 2); "
                                                          "greedy: SPSA's probes, the step along the one best "
                                                          "aligned with the gradient (2n; n >= 2)")
    adaptive: Adaptive | None = Field(None, description="none: lr as given; scalar_rms: lr divided by a running "
                                                        "RMS of the projected gradients (two scalars of state)")
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    schedule: LRSchedule | None = Field(None, description="the lr over the job's steps: constant, or a linear or "
                                                         "cosine decay to 0 (default: the recipe's)")
    warmup_steps: int = Field(0, ge=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    wait: bool = Field(False, description="with steps = 1: answer with the step's result instead of a job id")
    chat: bool = Field(False, description="wrap each prompt as the user's turn of the model's chat template, the "
                                          "options or completion following the assistant's turn start")
    adapter: AdapterIn | None = Field(None, description="train this LoRA adapter instead of the served weights")

    @model_validator(mode="after")
    def _one_kind_of_example(self) -> StepRequest:
        if bool(self.examples) == (self.dataset is not None):
            raise ValueError("give either examples (at least one) or a dataset")
        if self.dataset is not None and self.eval_examples:
            raise ValueError("with a dataset, the held-out examples come from its eval_size")
        _one_kind(self.examples + self.eval_examples, "examples and eval_examples")
        if self.eval_every and not (self.eval_examples or (self.dataset and self.dataset.eval_size)):
            raise ValueError("eval_every needs eval_examples (or a dataset with eval_size)")
        if self.wait and self.steps != 1:
            raise ValueError("wait is only for steps = 1; poll GET /mezo/jobs/{id} for longer jobs")
        return self


class StepOut(BaseModel):
    step: int
    loss: float
    """The step's loss estimate: the mean of its L+ and L-."""
    loss_plus: list[float]
    loss_minus: list[float]
    projected_grads: list[float]
    lr: float
    step_ms: float
    """Wall time of the step inside the scheduler, during which user batches wait."""

    @classmethod
    def of(cls, report: StepReport) -> StepOut:
        r = report.result
        return cls(step=report.step, loss=r.loss, loss_plus=list(r.loss_plus), loss_minus=list(r.loss_minus),
                   projected_grads=list(r.projected_grads), lr=r.lr, step_ms=report.step_ms)


class RecipeOut(BaseModel):
    """What a job got for the knobs it left out (README, "Defaults")."""

    recipe: Literal["final-norm", "scaled", "adapter", "none"]
    why: str
    sources: dict[str, Literal["job", "flag", "recipe"]]
    """Each knob (lr, eps, n_probes, estimator, adaptive, selection, schedule): who set it."""
    trained_numbers: int | None = None
    lr: float
    eps: float
    adaptive: str
    estimator: str
    n_probes: int
    schedule: str

    @classmethod
    def of(cls, job: Job) -> RecipeOut | None:
        choice, config = job.spec.recipe, job.spec.config
        if choice is None:
            return None
        return cls(**choice.to_dict(), lr=config.lr, eps=config.eps, adaptive=config.adaptive.value,
                   estimator=config.estimator.value, n_probes=config.n_probes, schedule=config.schedule.value)


class JobOut(BaseModel):
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    step: int
    total_steps: int
    last: StepOut | None = None
    zero_grad_steps: int
    """Steps whose every probe had L+ = L- exactly (g = 0): no update. Common with the accuracy objective."""
    zero_grad_rate: float
    """The share of probes with g = 0 so far."""
    abs_grad_quantiles: dict[str, float] = Field(default_factory=dict)
    """|g| over the probes so far: min, p10, p50, p90, max."""
    evals: list[JobEvalOut] = Field(default_factory=list)
    best_eval: JobEvalOut | None = None
    """The evaluation with the best accuracy (choice examples), else F1 (with eval_generate), else loss, ties going
    to the lower loss; POST /mezo/reset with its step restores those weights exactly."""
    longest_step_ms: float
    """The longest a user request waited for one step of this job."""
    elapsed_s: float
    eta_s: float | None = None
    error: str | None = None
    error_kind: FailureKind | None = None
    """What kind of failure ``error`` describes (``step_failed``, ``weights_inconsistent``, …)."""
    weights_inconsistent: bool = False
    recipe: RecipeOut | None = None
    """The knobs this job left out and what it got for them (None: a job restored from the journal)."""

    @classmethod
    def of(cls, job: Job) -> JobOut:
        stats = job.grad_stats()
        best = job.best_eval
        quantiles = stats.abs_grad_quantiles
        return cls(
            job_id=job.id, status=job.status.value, step=job.steps_done, total_steps=job.spec.steps,
            last=StepOut.of(job.reports[-1]) if job.reports else None,
            zero_grad_steps=stats.zero_grad_steps, zero_grad_rate=stats.zero_grad_rate,
            abs_grad_quantiles=dataclasses.asdict(quantiles) if quantiles else {},
            evals=[JobEvalOut.of_evaluation(e) for e in job.evals],
            best_eval=JobEvalOut.of_evaluation(best) if best else None,
            longest_step_ms=job.longest_step_ms, elapsed_s=job.elapsed_s(), eta_s=job.eta_s(),
            error=job.failure.message if job.failure else None, error_kind=job.failure.kind if job.failure else None,
            weights_inconsistent=job.weights_lost, recipe=RecipeOut.of(job),
        )


class JobHistoryOut(BaseModel):
    """Every committed step's measurements (the L+/L- curves) and every evaluation of a job."""

    job_id: str
    steps: list[StepOut]
    evals: list[JobEvalOut]

    @classmethod
    def of(cls, job: Job) -> JobHistoryOut:
        return cls(job_id=job.id, steps=[StepOut.of(r) for r in job.reports],
                   evals=[JobEvalOut.of_evaluation(e) for e in job.evals])


class JobListOut(BaseModel):
    jobs: list[JobOut]


class ResetRequest(_Strict):
    """Where to put the served weights: the base checkpoint (no ``job_id``), or right after ``step`` committed steps
    of a job the served weights carry (all its steps if ``step`` is left out)."""

    job_id: str | None = None
    step: int | None = Field(None, ge=0, description="needs a job_id")


class ServedSegmentOut(BaseModel):
    job_id: str
    steps: int
    """Committed steps of the job that the served weights carry."""
    records: int
    """How many records of the job's trajectory those are (failed steps' probe passes included): replaying the
    first ``records`` of them reproduces the served weights exactly."""

    @classmethod
    def of(cls, segment: ServedSegment) -> ServedSegmentOut:
        return cls(job_id=segment.job_id, steps=segment.steps, records=len(segment.trajectory))


class PrecisionOut(BaseModel):
    """How the served weights are held, and what training costs on top of them."""

    served_dtype: str
    master: str
    """Where the fp32 masters of half-precision trainable weights live: ``device``, ``host``, or ``none``."""
    master_bytes_per_parameter: int
    """Memory training adds per trainable parameter (4 with masters, 0 without)."""
    can_train: bool
    reason: str = ""

    @classmethod
    def of(cls, precision: Precision) -> PrecisionOut:
        return cls(served_dtype=precision.served_dtype, master=precision.master,
                   master_bytes_per_parameter=precision.master_bytes_per_parameter,
                   can_train=precision.refusal is None, reason=precision.refusal or "")


class AdapterOut(BaseModel):
    """A trained adapter as this server serves it: the version its name serves now (a LoRA adapter of SGLang's, by
    ``name``; OpenAI's routes reach it as ``<base>:<name>``)."""

    name: str
    weight_version: str
    """The version's label (``mezo-<job>-<steps>``): also its SGLang LoRA id."""
    job_id: str
    steps: int
    rank: int
    alpha: float
    target_modules: list[str]
    trained_on: str
    """The served weights' label when its job started."""
    base_changed: bool
    """The served weights are no longer ``trained_on``: the adapter serves on another base than it was trained on."""

    @classmethod
    def of(cls, job: Job, served_version: str) -> AdapterOut:
        version, spec = job.adapter_version, job.spec.adapter.spec
        return cls(name=version.name, weight_version=version.label, job_id=job.id, steps=version.committed_steps,
                   rank=spec.rank, alpha=spec.alpha, target_modules=list(spec.target_modules),
                   trained_on=job.trained_on, base_changed=bool(job.trained_on) and job.trained_on != served_version)


class FingerprintOut(BaseModel):
    """One replica's SHA-256 of the weights jobs can move (its TP rank 0's shard), byte for byte."""

    dp_rank: int
    tp_rank: int
    digest: str
    tensors: int
    weight_version: str
    consistent: bool
    exchanged_bytes: int
    """Payload this replica has put into the replicas' collectives since launch (0 with one replica)."""
    exchanges: int
    server: int = 0
    """In a fleet: the server that holds the replica (its ``--mezo-fleet-rank``; the leader lists every server's)."""

    @classmethod
    def of(cls, fingerprint: ReplicaFingerprint) -> FingerprintOut:
        return cls(**dataclasses.asdict(fingerprint))


class WeightsOut(BaseModel):
    """What the served weights are: the base checkpoint plus these jobs' steps, in order; and the adapters served
    beside them."""

    base_model: str
    weight_version: str
    """SGLang's label of these weights, as responses report it in ``meta_info["weight_version(s)"]``."""
    history: list[ServedSegmentOut]
    weights_lost: bool = False
    """A weight pass failed part-way and restoring failed too: training is off until a reset succeeds."""
    message: str = ""
    precision: PrecisionOut | None = None
    adapters: list[AdapterOut] = []
    fingerprints: list[FingerprintOut] | None = None
    """With ``?fingerprint=1``: each data-parallel replica's digest of its weights, computed for this request."""

    @classmethod
    def of(cls, weights: ServedWeights, message: str = "", precision: Precision | None = None,
           adapters: Sequence[Job] = (), fingerprints: Sequence[ReplicaFingerprint] | None = None) -> WeightsOut:
        return cls(base_model=weights.base_model, weight_version=weights.weight_version, weights_lost=weights.lost,
                   message=message, history=[ServedSegmentOut.of(s) for s in weights.segments],
                   precision=None if precision is None else PrecisionOut.of(precision),
                   adapters=[AdapterOut.of(job, weights.weight_version) for job in adapters],
                   fingerprints=None if fingerprints is None else [FingerprintOut.of(f) for f in fingerprints])


class SaveRequest(_Strict):
    """Where to write the served weights as a Hugging Face checkpoint (a folder on the server)."""

    path: str = Field(min_length=1, description="a folder name inside the server's --mezo-output-dir (shared by "
                                                "all TP ranks)")
    overwrite: bool = Field(False, description="replace a folder of that name that an earlier save wrote")
    dtype: Literal["checkpoint", "float32"] = Field(
        "checkpoint", description="the trained tensors in the base checkpoint's dtype, or in float32 (a "
                                  "half-precision server's fp32 masters as they are, not rounded)")
    adapter: str | None = Field(None, max_length=128, description="a trained adapter's name: write the version "
                                                                  "it serves as a PEFT folder instead")


class SaveOut(BaseModel):
    path: str
    weight_version: str
    """The label of the saved weights (see GET /mezo/weights)."""
    tensors: list[str]
    """The checkpoint tensors written from the served weights: every tensor a job of this server could train
    (the others are copied from the base checkpoint, unchanged)."""
    message: str

    @classmethod
    def of(cls, path: str, report: SaveReport) -> SaveOut:
        return cls(path=path, weight_version=report.weight_version, tensors=list(report.tensors),
                   message=report.message)


class DiagnoseRequest(_Strict):
    """An ε diagnostic: for each ε, ``probes`` SPSA probes on the same batch, without any update (lr = 0), to see
    whether the objective gives a signal at that scale (an accuracy objective usually does not)."""

    examples: list[ExampleIn] = Field(min_length=1, max_length=256, description="the batch, scored whole")
    objective: Objective | None = None
    eps: list[float] = Field([1e-4, 1e-3, 1e-2], min_length=1, max_length=8)
    probes: int = Field(8, ge=1, le=64)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    chat: bool = Field(False, description="wrap each prompt as the user's turn of the model's chat template, the "
                                          "options or completion following the assistant's turn start")

    @model_validator(mode="after")
    def _valid(self) -> DiagnoseRequest:
        _one_kind(self.examples, "examples")
        if any(not 0 < e <= 0.1 for e in self.eps):
            raise ValueError("every eps must be in (0, 0.1]")
        return self


class DiagnoseOut(BaseModel):
    objective: Objective
    results: list[EpsDiagnosis]
    """Per ε (see :class:`sglang_mezo.jobs.diagnose.EpsDiagnosis` for each field)."""
