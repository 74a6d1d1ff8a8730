"""The ``/mezo/*`` routes. Built by the plugin with the job runner and the tokenizer it provides."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response, StreamingResponse
from pydantic import TypeAdapter, ValidationError

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import Objective
from sglang_mezo.jobs.data import examples_from_records, load_records
from sglang_mezo.jobs.runner import Busy, Job, JobRunner, JobSpec, JobStatus
from sglang_mezo.jobs.templates import ClassificationTemplate, GenerationTemplate, MultipleChoiceTemplate

from .api import (ChoiceExampleIn, DatasetIn, DiagnoseOut, DiagnoseRequest, EpsDiagnosisOut, EvalOut, EvalRequest,
                  ExampleIn, JobEvalOut, JobHistoryOut, JobListOut, JobOut, ResetRequest, SaveOut, SaveRequest,
                  ServedSegmentOut, StepOut, StepRequest, WeightsOut)
from .plot import job_plot_png


def job_out(job: Job) -> JobOut:
    last = job.history[-1] if job.history else None
    stats = job.grad_stats()
    return JobOut(
        job_id=job.id,
        status=job.status.value,
        step=job.steps_done,
        total_steps=job.spec.steps,
        last=StepOut(**{k: last[k] for k in StepOut.model_fields}) if last else None,
        **stats,
        evals=[JobEvalOut(**e) for e in job.evals],
        best_eval=JobEvalOut(**job.best_eval) if job.best_eval else None,
        longest_step_ms=max((r["step_ms"] for r in job.history), default=0.0),
        elapsed_s=job.elapsed_s(),
        eta_s=job.eta_s(),
        error=job.error,
        weights_inconsistent=job.inconsistent_weights,
    )


def objective_for(examples: list[ExampleIn], requested: Objective | None) -> Objective:
    """The requested objective, or the default for the kind of examples; 400 if they do not fit."""
    choice = isinstance(examples[0], ChoiceExampleIn)
    objective = requested or (Objective.CLASSIFICATION if choice else Objective.CROSS_ENTROPY)
    if choice == (objective is Objective.CROSS_ENTROPY):
        raise HTTPException(400, f"objective {objective.value} does not fit "
                                 f"{'prompt/options/label' if choice else 'prompt/completion'} examples")
    return objective


_TEMPLATES = {"classification": ClassificationTemplate, "multiple_choice": MultipleChoiceTemplate,
              "generation": GenerationTemplate}


def dataset_examples(spec: DatasetIn, for_training: bool = True) -> tuple[list[ExampleIn], list[ExampleIn]]:
    """Training and held-out examples from a data file on the server (blocking: run it in a thread). For an
    evaluation (``for_training`` False) every record may be held out, and with no held-out set the "training"
    part is every record (``train_size`` does not apply)."""
    fields = spec.template.model_dump(exclude={"kind"})
    template = _TEMPLATES[spec.template.kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    try:
        records = load_records(spec.path, spec.format, spec.split)
        train, held_out = examples_from_records(records, template, eval_size=spec.eval_size,
                                                train_size=spec.train_size if for_training else None,
                                                seed=spec.seed, require_train=for_training)
        adapter = TypeAdapter(list[ExampleIn])
        return adapter.validate_python(train), adapter.validate_python(held_out)
    except (ValueError, ValidationError) as exc:  # DataError and TemplateError are ValueErrors
        raise HTTPException(400, f"dataset {spec.path}: {exc}") from exc


def build_router(runner: JobRunner, *, tokenizer, defaults: MezoConfig, max_steps: int, context_len: int,
                 base_model: str) -> APIRouter:
    router = APIRouter(prefix="/mezo", tags=["mezo"])

    def refuse_if_weights_lost() -> None:
        if runner.weights_lost:
            raise HTTPException(409, "the served weights are at no committed step (a restore failed): POST "
                                     "/mezo/reset first")

    def tokenize(examples: list[ExampleIn], what: str = "example") -> list[dict]:
        def ids(text: str, special: bool) -> list[int]:
            return list(tokenizer(text, add_special_tokens=special)["input_ids"])

        out = []
        for i, example in enumerate(examples):
            prompt = ids(example.prompt, True)
            if isinstance(example, ChoiceExampleIn):
                wire = {"prompt": prompt, "options": [ids(o, False) for o in example.options], "label": example.label}
                longest = max(len(o) for o in wire["options"])
            else:
                wire = {"prompt": prompt, "completion": ids(example.completion, False)}
                longest = len(wire["completion"])
            if len(prompt) + longest >= context_len:  # SGLang refuses an input that fills the whole context
                raise HTTPException(400, f"{what} {i} has {len(prompt) + longest} tokens; it must be shorter than "
                                         f"the model's context length, {context_len}")
            out.append(wire)
        return out

    @router.post("/step")
    async def step(request: StepRequest) -> JobOut | StepOut:
        if request.steps > max_steps:
            raise HTTPException(400, f"steps={request.steps} is more than this server allows per job "
                                     f"(--mezo-max-steps-per-job {max_steps})")
        examples, eval_examples = request.examples, request.eval_examples
        if request.dataset is not None:
            examples, eval_examples = await asyncio.to_thread(dataset_examples, request.dataset)
        objective = objective_for(examples, request.objective)
        refuse_if_weights_lost()
        # the server's --mezo-* defaults, overridden by what the request sets (replace re-validates)
        try:
            config = dataclasses.replace(
                defaults,
                **request.model_dump(include={"lr", "eps", "n_probes", "z_kind"}, exclude_none=True),
                **request.model_dump(include={"weight_decay", "schedule", "warmup_steps", "seed"}),
                total_steps=request.steps,
            )
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        # large example lists: keep the event loop free
        train_ids = await asyncio.to_thread(tokenize, examples)
        eval_ids = await asyncio.to_thread(tokenize, eval_examples, "eval example")
        job = runner.submit(JobSpec(examples=train_ids, objective=objective, config=config,
                                    batch_size=request.batch_size, base_model=base_model,
                                    eval_examples=eval_ids, eval_every=request.eval_every,
                                    eval_generate=request.eval_generate))
        if not request.wait:
            return job_out(job)
        await job.done.wait()
        if job.status is not JobStatus.SUCCEEDED:
            raise HTTPException(409 if job.status is JobStatus.CANCELLED else 422, job.error or job.status.value)
        return StepOut(**{k: job.history[0][k] for k in StepOut.model_fields})

    @router.post("/eval")
    async def eval_examples(request: EvalRequest) -> EvalOut:
        """Score examples under the served weights; batched with user traffic, nothing changes. While a job runs,
        a step may commit meanwhile: ``weight_version`` then lists both."""
        refuse_if_weights_lost()
        examples = request.examples
        if request.dataset is not None:
            train, held_out = await asyncio.to_thread(dataset_examples, request.dataset, False)
            examples = held_out if request.dataset.eval_size else train
        objective = objective_for(examples, request.objective)
        examples = await asyncio.to_thread(tokenize, examples)
        try:
            metrics, version = await runner.evaluate(objective, examples, request.generate)
        except ValueError as exc:  # SGLang refused an input
            raise HTTPException(400, str(exc)) from exc
        return EvalOut(**metrics.to_dict(), weight_version=version)

    @router.post("/diagnose")
    async def diagnose(request: DiagnoseRequest) -> DiagnoseOut:
        """For each ε: ``probes`` probes of the batch with lr = 0 (an ordinary job: it queues behind others, and
        its probes' round trips are recorded, so the served weights stay exactly described)."""
        refuse_if_weights_lost()
        objective = objective_for(request.examples, request.objective)
        examples = await asyncio.to_thread(tokenize, request.examples)
        results = []
        for eps in request.eps:
            config = dataclasses.replace(defaults, lr=0.0, eps=eps, n_probes=1, weight_decay=0.0,
                                         total_steps=request.probes, seed=request.seed)
            job = runner.submit(JobSpec(examples=examples, objective=objective, config=config,
                                        batch_size=len(examples), base_model=base_model, purpose="diagnose"))
            await job.done.wait()
            if job.status is not JobStatus.SUCCEEDED:
                raise HTTPException(409 if job.status is JobStatus.CANCELLED else 422,
                                    f"the probes at eps={eps} stopped: {job.error or job.status.value}")
            diffs = sorted(abs(p - m) for r in job.history for p, m in zip(r["loss_plus"], r["loss_minus"]))
            grads = sorted(abs(g) for r in job.history for g in r["projected_grads"])
            losses = [(p + m) / 2 for r in job.history for p, m in zip(r["loss_plus"], r["loss_minus"])]
            results.append(EpsDiagnosisOut(eps=eps, nonzero_rate=sum(1 for d in diffs if d) / len(diffs),
                                           median_abs_loss_diff=diffs[len(diffs) // 2],
                                           median_abs_grad=grads[len(grads) // 2],
                                           loss=sum(losses) / len(losses), job_id=job.id))
        return DiagnoseOut(objective=objective, results=results)

    @router.get("/jobs")
    async def list_jobs() -> JobListOut:
        return JobListOut(jobs=[job_out(j) for j in runner.jobs.values()])

    def find(job_id: str) -> Job:
        if job_id not in runner.jobs:
            raise HTTPException(404, f"no job {job_id!r}")
        return runner.jobs[job_id]

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> JobOut:
        return job_out(find(job_id))

    @router.get("/jobs/{job_id}/history")
    async def job_history(job_id: str) -> JobHistoryOut:
        job = find(job_id)
        return JobHistoryOut(job_id=job.id, steps=[StepOut(**{k: r[k] for k in StepOut.model_fields})
                                                   for r in job.history],
                             evals=[JobEvalOut(**e) for e in job.evals])

    @router.get("/jobs/{job_id}/plot", response_class=Response,
                responses={200: {"content": {"image/png": {}}, "description": "the job's curves"}})
    async def job_plot(job_id: str) -> Response:
        """The job's L+/L- per step and its held-out evaluations, as a PNG."""
        job = find(job_id)
        if not job.history and not job.evals:
            raise HTTPException(409, f"job {job_id} has nothing to plot yet")
        png = await asyncio.to_thread(job_plot_png, job.id, list(job.history), list(job.evals))
        return Response(png, media_type="image/png")

    @router.get("/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        """Server-Sent Events: the job's status (as GET /mezo/jobs/{id}) whenever it changes, until it finishes;
        the last event is named ``end``."""
        job = find(job_id)

        async def events():
            seen, quiet = None, 0.0
            while True:
                state = (job.status, job.steps_done, len(job.evals))
                if state != seen:
                    seen, quiet = state, 0.0
                    name = "end" if job.status.finished else "status"
                    yield f"event: {name}\ndata: {job_out(job).model_dump_json()}\n\n"
                    if job.status.finished:
                        return
                elif quiet >= 15.0:  # a comment line: keeps proxies open, and a gone client ends the stream
                    quiet = 0.0
                    yield ": ping\n\n"
                await asyncio.sleep(0.1)
                quiet += 0.1

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str) -> JobOut:
        find(job_id)
        return job_out(runner.cancel(job_id))

    @router.get("/jobs/{job_id}/trajectory")
    async def trajectory(job_id: str) -> dict:
        job = find(job_id)
        if job.trajectory is None:
            raise HTTPException(409, f"job {job_id} has no committed step yet")
        return job.trajectory.to_dict()

    def weights_out(message: str = "") -> WeightsOut:
        return WeightsOut(base_model=base_model, weight_version=runner.weight_version,
                          weights_lost=runner.weights_lost, message=message,
                          history=[ServedSegmentOut(job_id=s.job_id, steps=s.steps, records=len(s.trajectory))
                                   for s in runner.served])

    @router.get("/weights")
    async def weights() -> WeightsOut:
        return weights_out()

    @router.post("/reset")
    async def reset(request: ResetRequest) -> WeightsOut:
        """Re-read the trainable tensors from the checkpoint and replay the kept history exactly: the weights are
        bit-identical to the ones served at that point (no model reload)."""
        try:
            message = await runner.reset(request.job_id, request.step)
        except Busy as exc:
            raise HTTPException(409, str(exc)) from exc
        except KeyError as exc:
            raise HTTPException(404, f"the served weights carry no job {request.job_id!r}") from exc
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        except RuntimeError as exc:
            raise HTTPException(503, str(exc)) from exc
        return weights_out(message)

    @router.post("/save")
    async def save(request: SaveRequest) -> SaveOut:
        """Write the served weights, at the moment the scheduler handles this request, as an HF checkpoint (plus
        mezo_history.json, the trajectories from the base). Serving waits while the files are written."""
        path = Path(request.path)
        if not path.is_absolute():
            raise HTTPException(400, f"path must be absolute on the server, got {request.path!r}")
        try:
            if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not request.overwrite)):
                raise HTTPException(409, f"{request.path} exists and is not an empty folder (set overwrite to "
                                         "write into it)")
            if path.resolve() == Path(base_model).resolve():
                raise HTTPException(409, "refusing to overwrite the base checkpoint: resets re-read it")
            path.mkdir(parents=True, exist_ok=True)
            report = await runner.save(str(path))
        except (OSError, ValueError) as exc:  # permissions, a NUL byte in the path, ...
            raise HTTPException(400, f"cannot write to {request.path}: {exc}") from exc
        except Busy as exc:
            raise HTTPException(409, str(exc)) from exc
        except RuntimeError as exc:
            raise HTTPException(503, str(exc)) from exc
        return SaveOut(path=str(path), **report)

    return router
