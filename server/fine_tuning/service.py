"""OpenAI's fine-tuning jobs on top of the MeZO job runner: a job validates its files, becomes one ``/mezo`` job,
and reads its status, events and checkpoints from that job as it runs.

Status: ``validating_files`` while the files are parsed and tokenized (in a thread); then the runner's own
``queued → running → succeeded | failed | cancelled``. A file that does not validate ends the job ``failed`` with
OpenAI's error object naming the file and the line; nothing reaches the runner.

Names: a job that succeeded produced ``ft:<base>:<suffix>:<job id>`` (suffix default ``mezo``); each evaluation of
its validation file is a checkpoint, ``<that name>:ckpt-step-<k>``. A name is *served* exactly when the served
weights carry its SGLang weight version (one label per bit-exact state), so a request naming it is answered by
those weights or refused; nothing is guessed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sglang_mezo.core.recipe import JobDefaults
from sglang_mezo.jobs.errors import Conflict, InvalidRequest, MezoError, NotFound
from sglang_mezo.jobs.job import Evaluation, Job, JobStatus
from sglang_mezo.jobs.runner import JobRunner
from sglang_mezo.options import Limits
from sglang_mezo.protocol import StepReport, weight_version_label

from ..adapter_starts import AdapterStarts
from ..schemas import AdapterShapeIn
from ..translate import LoraLaunch
from .files import FileStore
from .hyperparameters import Resolved, auto
from .job_spec import FileError, SpecBuilder
from .results import metrics_csv, trained_tokens, valid_metrics
from .schemas import CheckpointOut, ErrorOut, EventOut, HyperparametersOut, JobCreate, JobOut, MethodOut
from .translate import FileTranslator

logger = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled")
METRICS_EVERY = 10
"""A metrics event every this many steps (and at the last): enough to draw the curve, few enough to page through."""


@dataclass
class FineTuningJob:
    id: str
    request: JobCreate
    created_at: int
    status: str = "validating_files"
    error: ErrorOut | None = None
    resolved: Resolved | None = None
    job: Job | None = None
    """The runner's job, once the files validated."""
    events: list[EventOut] = field(default_factory=list)
    finished_at: int | None = None
    trained_tokens: int | None = None
    cancel_requested: bool = False
    result_files: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.request.method_type


class FineTuning:
    """Every fine-tuning job of this server (in memory: a restart keeps the files, the /mezo journal and the
    served weights, not this listing)."""

    def __init__(self, runner: JobRunner, store: FileStore, translator: FileTranslator, defaults: JobDefaults,
                 limits: Limits, model_name: str, lora: LoraLaunch = LoraLaunch(),
                 starts: AdapterStarts | None = None) -> None:
        self.runner = runner
        self.starts = starts or AdapterStarts(runner)
        self.store = store
        self.specs = SpecBuilder(store, translator, defaults, limits, lora, runner.weights.base_model)
        self.model_name = model_name
        self.jobs: dict[str, FineTuningJob] = {}
        self._of_runner_job: dict[str, FineTuningJob] = {}
        self._tasks: set[asyncio.Task] = set()
        runner.observers.append(self)

    # -- names ---------------------------------------------------------------------------------------------------

    def _short_base(self) -> str:
        return Path(self.model_name).name or self.model_name

    def fine_tuned_name(self, ft: FineTuningJob) -> str:
        return f"ft:{self._short_base()}:{ft.request.suffix or 'mezo'}:{ft.id}"

    def adapter_name(self, ft: FineTuningJob) -> str:
        """The name an adapter fine-tune is served under in SGLang: its model name's tail after ``ft:``, which is
        what SGLang's OpenAI routes take as the adapter when they split ``ft:<base>:<suffix>:<job>`` at its first
        colon."""
        return self.fine_tuned_name(ft).removeprefix("ft:")

    def _adapter_fine_tune(self, model: str) -> FineTuningJob | None:
        return next((ft for ft in self.jobs.values() if ft.job is not None and ft.job.spec.adapter is not None
                     and ft.status == "succeeded" and self.fine_tuned_name(ft) == model), None)

    def served_version(self, model: str) -> str | None:
        """The weight version a fine-tuned model name stands for (None: not one of this server's names)."""
        for ft in self.jobs.values():
            if ft.job is None or ft.status != "succeeded":
                continue
            name = self.fine_tuned_name(ft)
            if ft.job.spec.adapter is not None:  # an adapter: its served version, and no checkpoint names
                if model == name and ft.job.adapter_version is not None:
                    return ft.job.adapter_version.label
                continue
            if model == name:
                return weight_version_label(ft.job.id, ft.job.steps_done)
            prefix = f"{name}:ckpt-step-"
            if model.startswith(prefix) and model[len(prefix):].isdigit():
                step = int(model[len(prefix):])
                if step > 0 and any(e.step == step for e in ft.job.evals):  # the checkpoints listed, no others
                    return weight_version_label(ft.job.id, step)
        return None

    def check_served(self, model: str) -> None:
        """Refuse a request that names a model whose weights are not the served ones."""
        if model == self.model_name or not model.startswith("ft:"):
            return
        if self._adapter_fine_tune(model) is not None:  # served beside the base, whatever trains
            return
        version = self.served_version(model)
        if version is None:
            raise NotFound(f"the model {model!r} does not exist on this server")
        # a job running, or queued (it may start while this request generates), would change the weights under it
        training = [job.id for job in self.runner.jobs.values() if not job.status.finished]
        if training:
            raise Conflict(f"the model {model!r} cannot be named while job {training[0]} trains the served "
                           "weights or waits to; name it again when the job has ended")
        if version != self.runner.weights.weight_version:
            raise Conflict(f"the model {model!r} is not being served now (the served weights are "
                           f"{self.runner.weights.weight_version}): restore it with POST /mezo/reset")

    def is_fine_tuned_adapter(self, adapter: str) -> bool:
        """Whether ``adapter`` is the adapter of one of this service's jobs."""
        return any(ft.job is not None and ft.job.spec.adapter is not None and ft.job.spec.adapter.name == adapter
                   for ft in self.jobs.values())

    def routed_model(self, model: str) -> str:
        """What SGLang is asked for when a request names fine-tuned ``model`` (checked served): the base model, or
        for an adapter ``<base>:<adapter>``."""
        ft = self._adapter_fine_tune(model)
        return self.model_name if ft is None else f"{self.model_name}:{self.adapter_name(ft)}"

    def model_names(self) -> list[str]:
        """The fine-tuned models this server can name (succeeded jobs), oldest first."""
        return [self.fine_tuned_name(ft) for ft in self.jobs.values() if ft.status == "succeeded"]

    # -- create, validate, submit --------------------------------------------------------------------------------

    def create(self, request: JobCreate) -> FineTuningJob:
        if request.model != self.model_name and self.served_version(request.model) is None:
            raise InvalidRequest(f"model: {request.model!r} is not served here; this server fine-tunes "
                                 f"{self.model_name!r}")
        adapter = self._adapter_fine_tune(request.model)
        named = request.mezo.adapter.start_from if request.mezo and request.mezo.adapter else None
        if adapter is not None and named not in (None, self.adapter_name(adapter)):
            raise InvalidRequest(f"mezo.adapter.start_from={named!r}: the job continues {request.model!r}, which is "
                                 f"adapter {self.adapter_name(adapter)!r}; leave start_from out")
        self.check_served(request.model)  # a fine-tuned name continues from its weights, only while they are served
        for param in ("training_file", "validation_file"):
            file_id = getattr(request, param)
            if file_id is not None:
                self.store.get(file_id)  # 404 now for a file that does not exist
        ft = FineTuningJob(f"ftjob-{uuid.uuid4().hex[:24]}", request, int(time.time()))
        self.jobs[ft.id] = ft
        self._event(ft, f"Created fine-tuning job: {ft.id}")
        self._event(ft, "Validating training file: " + request.training_file)
        task = asyncio.get_running_loop().create_task(self._prepare(ft))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return ft

    def _adapter_request(self, ft: FineTuningJob) -> AdapterShapeIn | None:
        """The adapter section of ``ft``: its own, or, for a job on a fine-tuned adapter's name, that adapter's
        continuation (an adapter job that starts from it)."""
        request = ft.request
        own = request.mezo.adapter if request.mezo else None
        continued = self._adapter_fine_tune(request.model)
        if continued is None:
            return own
        return (own or AdapterShapeIn()).model_copy(update={"start_from": self.adapter_name(continued)})

    async def _prepare(self, ft: FineTuningJob) -> None:
        try:
            section = self._adapter_request(ft)
            start = None if section is None or section.start_from is None else await self.starts.resolve(
                section.start_from)
            spec, ft.resolved = await asyncio.to_thread(self.specs.build, ft.request, self.adapter_name(ft),
                                                        section, start)
            if ft.cancel_requested:  # cancelled while its files were read: it ended then, nothing to submit
                return
            ft.job = self.runner.submit(spec)
        except FileError as exc:
            return self._fail(ft, ErrorOut(code=f"invalid_{exc.param}", message=str(exc), param=exc.param))
        except MezoError as exc:
            return self._fail(ft, ErrorOut(code=exc.kind, message=str(exc)))
        except Exception as exc:
            logger.exception("fine-tuning job %s: validation crashed", ft.id)
            return self._fail(ft, ErrorOut(code="internal_error", message=f"validation failed ({type(exc).__name__}; "
                                           "the server's log has the details)"))
        self._of_runner_job[ft.job.id] = ft
        ft.status = "queued"
        self._event(ft, f"Files validated; {ft.resolved.steps} MeZO steps queued as /mezo job {ft.job.id}")
        if spec.recipe is not None:
            self._event(ft, f"MeZO settings ({spec.recipe.recipe}): {spec.recipe.why}")

    # -- following the runner's job (JobObserver) ----------------------------------------------------------------

    def on_start(self, job: Job) -> None:
        ft = self._of_runner_job.get(job.id)  # set when it was submitted, before the runner could start it
        if ft is not None and ft.status == "queued":
            ft.status = "running"
            self._event(ft, "Fine-tuning job started")

    def on_steps(self, job: Job, reports: Sequence[StepReport]) -> None:
        ft = self._of_runner_job.get(job.id)
        if ft is None:
            return
        total = job.spec.steps
        for report in reports:
            step = report.step + 1
            if step % METRICS_EVERY == 0 or step == total:
                self._event(ft, f"Step {step}/{total}: training loss={report.result.loss:.4f}", kind="metrics",
                            data={"step": step, "total_steps": total, "train_loss": report.result.loss,
                                  "step_ms": report.step_ms})

    def on_eval(self, job: Job, evaluation: Evaluation) -> None:
        ft = self._of_runner_job.get(job.id)
        if ft is not None:
            self._event(ft, f"Step {evaluation.step}: validation loss={evaluation.metrics.loss:.4f}",
                        kind="metrics", data={"step": evaluation.step, **valid_metrics(evaluation)})

    def on_finish(self, job: Job) -> None:
        ft = self._of_runner_job.get(job.id)
        if ft is None:
            return
        ft.trained_tokens = trained_tokens(job)
        if job.status is JobStatus.SUCCEEDED:
            self._keep_results(ft, job)
            self._end(ft, "succeeded", f"The job has successfully completed; model {self.fine_tuned_name(ft)}")
        elif job.status is JobStatus.CANCELLED:
            self._end(ft, "cancelled")
        else:
            failure = job.failure
            self._fail(ft, ErrorOut(code=failure.kind.value if failure else "failed",
                                    message=failure.message if failure else "the job failed"))

    def _keep_results(self, ft: FineTuningJob, job: Job) -> None:
        """OpenAI's ``result_files``: the metrics per step as CSV, and the trajectory (seeds and projected
        gradients: with the base checkpoint, the fine-tuned weights)."""
        results = [("step_metrics.csv", metrics_csv(job))]
        if job.trajectory is not None:
            results.append(("trajectory.json", json.dumps(job.trajectory.to_dict()).encode()))
        for name, data in results:
            try:
                ft.result_files.append(self.store.create_result(f"{ft.id}-{name}", data).id)
            except MezoError as exc:  # the file store is full: the weights are trained and served, the job succeeded
                self._event(ft, f"The result file {name} was not kept: {exc}", level="warn")
            except OSError:
                logger.exception("fine-tuning job %s: %s not kept", ft.id, name)
                self._event(ft, f"The result file {name} was not kept: the server could not write it", level="warn")

    # -- cancel --------------------------------------------------------------------------------------------------

    def cancel(self, ft: FineTuningJob) -> FineTuningJob:
        if ft.status in FINISHED:
            raise Conflict(f"job {ft.id} has already {ft.status}")
        ft.cancel_requested = True
        self._event(ft, "Cancellation requested")
        if ft.job is None:  # still validating its files: it ends now, and its validation is dropped when done
            self._end(ft, "cancelled")
        else:  # queued: ends now; running: at its next chunk boundary (on_finish)
            self.runner.cancel(ft.job.id)
        return ft

    # -- what the routes show ------------------------------------------------------------------------------------

    def get(self, job_id: str) -> FineTuningJob:
        if job_id not in self.jobs:
            raise NotFound(f"no fine-tuning job {job_id!r} on this server")
        return self.jobs[job_id]

    def out(self, ft: FineTuningJob) -> JobOut:
        resolved, job = ft.resolved, ft.job
        if resolved is not None:
            hyper = HyperparametersOut(batch_size=resolved.batch_size, n_epochs=resolved.n_epochs,
                                       learning_rate_multiplier=resolved.lr_multiplier, beta=resolved.beta)
        else:  # the file's size is not known yet
            given = ft.request.given_hyperparameters()
            hyper = HyperparametersOut(
                batch_size=auto(given.batch_size, "auto"), n_epochs=auto(given.n_epochs, "auto"),
                learning_rate_multiplier=auto(given.learning_rate_multiplier, "auto"),
                beta=auto(getattr(given, "beta", None), "auto") if ft.method == "dpo" else None)
        plain = hyper.model_dump(exclude_none=True)
        method = MethodOut(type=ft.method, **{ft.method: {"hyperparameters": plain}})
        estimated = None
        if job is not None and ft.status == "running" and job.steps_done and job.started:
            estimated = int(job.started + job.elapsed_s() / job.steps_done * job.spec.steps)
        succeeded = ft.status == "succeeded" and job is not None
        return JobOut(
            id=ft.id, model=ft.request.model, created_at=ft.created_at, finished_at=ft.finished_at,
            fine_tuned_model=self.fine_tuned_name(ft) if succeeded else None, status=ft.status,
            result_files=list(ft.result_files), validation_file=ft.request.validation_file,
            training_file=ft.request.training_file,
            hyperparameters=hyper, trained_tokens=ft.trained_tokens, error=ft.error,
            seed=job.spec.config.seed if job else (ft.request.seed or 0), estimated_finish=estimated,
            metadata=ft.request.metadata, method=method, user_provided_suffix=ft.request.suffix,
            mezo_job_id=job.id if job else None, steps=resolved.steps if resolved else None,
            weight_version=(job.adapter_version.label if job.spec.adapter is not None and job.adapter_version else
                            weight_version_label(job.id, job.steps_done)) if succeeded else None)

    def checkpoints(self, ft: FineTuningJob) -> list[CheckpointOut]:
        """Newest first: each evaluation of the validation file after a step (the step-0 one is the base)."""
        if ft.job is None or ft.job.spec.adapter is not None:  # an adapter serves its last version only
            return []
        name = self.fine_tuned_name(ft)
        out = []
        for evaluation in ft.job.evals:
            if evaluation.step == 0:
                continue
            train_loss = next((r.result.loss for r in ft.job.reports if r.step + 1 == evaluation.step), None)
            out.append(CheckpointOut(
                id=f"ftckpt-{ft.id[6:]}-{evaluation.step}", created_at=int(ft.job.started or ft.created_at),
                fine_tuned_model_checkpoint=f"{name}:ckpt-step-{evaluation.step}", fine_tuning_job_id=ft.id,
                step_number=evaluation.step, metrics={"step": float(evaluation.step), "train_loss": train_loss,
                                              **valid_metrics(evaluation)},
                weight_version=weight_version_label(ft.job.id, evaluation.step)))
        return out[::-1]

    # -- helpers -------------------------------------------------------------------------------------------------

    def _event(self, ft: FineTuningJob, message: str, *, kind: str = "message", level: str = "info",
               data: dict | None = None) -> None:
        ft.events.append(EventOut(id=f"ftevent-{ft.id[6:]}-{len(ft.events):06d}", created_at=int(time.time()),
                                  level=level, message=message, type=kind, data=data))

    def _fail(self, ft: FineTuningJob, error: ErrorOut) -> None:
        if ft.status in FINISHED:  # cancelled while validating: a job cancelled is not also failed
            return
        ft.error = error
        self._end(ft, "failed", f"The job failed: {error.message}", level="error")

    def _end(self, ft: FineTuningJob, status: str, message: str | None = None, level: str = "info") -> None:
        if ft.status in FINISHED:  # cancelled while validating: what validation found afterwards changes nothing
            return
        ft.status, ft.finished_at = status, int(time.time())
        self._event(ft, message or f"The job was {status}", level=level)
