"""The shapes of OpenAI's files and fine-tuning API (pydantic), as the ``openai`` client sends and reads them.

Requests are strict (an unknown field is a 400 naming it, rather than a setting silently ignored); responses carry
OpenAI's field names. MeZO's own knobs ride in one namespaced object, ``mezo`` (the ``openai`` client sends it
with ``extra_body={"mezo": {...}}``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from sglang_mezo.core.estimators import Adaptive, Estimator
from sglang_mezo.core.schedules import LRSchedule
from sglang_mezo.kernels import MAX_SEED, ZKind

from ..schemas import AdapterShapeIn, TrainSetIn

Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Hyperparameters(_Strict):
    """OpenAI's three, mapped to a MeZO job (README, "OpenAI fine-tuning API"): ``batch_size`` examples per step
    (auto: 16, or every example if fewer); ``n_epochs`` passes over the training file (auto: as many as make at
    least 100 steps); ``learning_rate_multiplier`` times the server's ``--mezo-lr`` (auto: 1)."""

    batch_size: Annotated[int, Field(ge=1)] | Auto | None = Field(None, description="examples per MeZO step")
    n_epochs: Annotated[int, Field(ge=1)] | Auto | None = Field(None, description="passes over the training examples")
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Auto | None = Field(
        None, description="times the server's --mezo-lr")


class DpoHyperparameters(Hyperparameters):
    beta: Annotated[float, Field(gt=0)] | Auto | None = Field(None, description="DPO's β (auto: 0.1)")


class SupervisedMethod(_Strict):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters | None = None


class MethodIn(_Strict):
    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class MezoKnobs(TrainSetIn, _Strict):
    """MeZO's own settings of a job (default: the server's ``--mezo-*``)."""

    eps: float | None = Field(None, gt=0)
    n_probes: int | None = Field(None, ge=1)
    z_kind: ZKind | None = None
    estimator: Estimator | None = None
    adaptive: Adaptive | None = None
    schedule: LRSchedule | None = Field(None, description="the lr over the job's steps: constant, or a linear or "
                                                         "cosine decay to 0 (default: the recipe's)")
    eval_every: int | None = Field(None, ge=1, description="steps between evaluations of the validation file, each "
                                                           "a checkpoint (default: a quarter of the steps)")
    adapter: AdapterShapeIn | None = Field(None, description=(
        "train a LoRA adapter in SGLang's pool instead of the served weights (the server needs --enable-lora); "
        "the fine-tuned model is served as that adapter, beside the unchanged base"))


class JobCreate(_Strict):
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: MethodIn | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[dict] | None = Field(None, max_length=0, description="not supported: leave it out")
    mezo: MezoKnobs | None = None

    @property
    def method_type(self) -> str:
        return self.method.type if self.method else "supervised"

    def given_hyperparameters(self) -> Hyperparameters | DpoHyperparameters:
        """The method's hyper-parameters if given there, else the top-level ones (OpenAI's older place)."""
        if self.method is not None:
            inner = self.method.dpo if self.method.type == "dpo" else self.method.supervised
            if inner is not None and inner.hyperparameters is not None:
                return inner.hyperparameters
        if self.hyperparameters is not None:
            return self.hyperparameters
        return DpoHyperparameters() if self.method_type == "dpo" else Hyperparameters()


# -- responses --------------------------------------------------------------------------------------------------------


class FileOut(BaseModel):
    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ErrorOut(BaseModel):
    """A job's error, OpenAI's shape: ``code`` names the kind, ``param`` the request field at fault."""

    code: str
    message: str
    param: str | None = None


class HyperparametersOut(BaseModel):
    """The values a job runs with; until its files are read, what was asked for ("auto" where nothing was)."""

    batch_size: int | Auto
    n_epochs: int | Auto
    learning_rate_multiplier: float | Auto
    beta: float | Auto | None = None


class MethodOut(BaseModel):
    type: Literal["supervised", "dpo"]
    supervised: dict | None = None
    dpo: dict | None = None


class JobOut(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str = "sglang-mezo"
    result_files: list[str]
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    validation_file: str | None
    training_file: str
    hyperparameters: HyperparametersOut | None
    trained_tokens: int | None
    error: ErrorOut | None
    seed: int
    estimated_finish: int | None
    integrations: list = Field(default_factory=list)
    metadata: dict[str, str] | None
    method: MethodOut
    user_provided_suffix: str | None
    mezo_job_id: str | None
    """The ``/mezo/jobs`` job that trains it (its history, plot, trajectory; ``/mezo/reset`` to a step of it)."""
    steps: int | None
    weight_version: str | None
    """SGLang's label of the weights the job produced (what a response served by them reports)."""


class EventOut(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict | None = None


class CheckpointOut(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float | None]
    weight_version: str
    """Restore these weights with ``POST /mezo/reset {"job_id": <mezo_job_id>, "step": <step_number>}``."""


class ListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
