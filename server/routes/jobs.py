"""``/mezo/step`` and ``/mezo/jobs/*``: submit a training job, follow it, cancel it, read what it produced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter
from sglang.srt.utils.auth import AuthLevel, auth_level
from fastapi.responses import Response, StreamingResponse

from sglang_mezo.jobs.errors import Conflict, InvalidRequest, JobFailed
from sglang_mezo.jobs.job import Job, JobStatus
from sglang_mezo.jobs.spec import JobSpec

from ..context import Context, PathJob
from ..errors import MezoRoute
from ..plot import job_plot_png
from ..schemas import JobHistoryOut, JobListOut, JobOut, StepOut, StepRequest
from ..sse import polled
from ..translate import check_count, check_tokens, dataset_texts, job_config, objective_for, texts

router = APIRouter(prefix="/mezo", tags=["mezo"], route_class=MezoRoute)

@router.post("/step")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def step(request: StepRequest, mezo: Context) -> JobOut | StepOut:
    """Queue a training job; with ``wait`` (one step), answer with the step's result."""
    config, recipe = job_config(mezo.defaults, request, mezo.limits)
    # an adapter trains through its own fp32 master: the served weights' precision does not matter to it
    adapter = None if request.adapter is None else await mezo.starts.target(request.adapter.name, request.adapter,
                                                                            mezo.lora, config)
    if adapter is None and mezo.precision.refusal:
        raise InvalidRequest(mezo.precision.refusal)
    train, held_out = texts(request.examples), texts(request.eval_examples)
    if request.dataset is not None:
        path = mezo.files.data_file(request.dataset.path)
        train, held_out = await asyncio.to_thread(dataset_texts, request.dataset, path)
    check_count(mezo.limits, len(train) + len(held_out))
    objective = objective_for(train, request.objective)
    # large example lists: keep the event loop free
    examples = await asyncio.to_thread(mezo.translator.tokenize, train, chat=request.chat)
    eval_examples = await asyncio.to_thread(mezo.translator.tokenize, held_out, "eval example", chat=request.chat)
    check_tokens(mezo.limits, examples, eval_examples)
    job = mezo.runner.submit(JobSpec(examples=examples, objective=objective, config=config,
                                     batch_size=request.batch_size, base_model=mezo.base_model,
                                     eval_examples=eval_examples, eval_every=request.eval_every,
                                     eval_generate=request.eval_generate, adapter=adapter, recipe=recipe))
    if not request.wait:
        return JobOut.of(job)
    await finished(job)
    return StepOut.of(job.reports[0])


async def finished(job: Job) -> Job:
    """Wait for ``job`` to end; refuse with why unless it succeeded."""
    await job.done.wait()
    if job.status is JobStatus.CANCELLED:
        raise Conflict(f"job {job.id} was cancelled")
    if job.status is not JobStatus.SUCCEEDED:
        assert job.failure is not None
        raise JobFailed(job.failure)
    return job


@router.get("/jobs")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def list_jobs(mezo: Context) -> JobListOut:
    return JobListOut(jobs=[JobOut.of(j) for j in mezo.runner.jobs.values()])


@router.get("/jobs/{job_id}")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def get_job(job: PathJob) -> JobOut:
    return JobOut.of(job)


@router.get("/jobs/{job_id}/history")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def job_history(job: PathJob) -> JobHistoryOut:
    """Every committed step's measurements (the L+/L- curves) and every evaluation."""
    return JobHistoryOut.of(job)


@router.get("/jobs/{job_id}/plot", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the job's curves"}})
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def job_plot(job: PathJob) -> Response:
    """The job's L+/L- per step and its held-out evaluations, as a PNG."""
    if not job.reports and not job.evals:
        raise Conflict(f"job {job.id} has nothing to plot yet")
    png = await asyncio.to_thread(job_plot_png, job.id, list(job.reports), list(job.evals))
    return Response(png, media_type="image/png")


@router.get("/jobs/{job_id}/events")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def job_events(job: PathJob, mezo: Context) -> StreamingResponse:
    """Server-Sent Events: the job's status (as GET /mezo/jobs/{id}) whenever it changes, until it finishes; the
    last event is named ``end``. At most ``--mezo-max-event-streams`` are open at once."""
    return StreamingResponse(mezo.streams.hold(status_events(job)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def status_events(job: Job, poll_s: float = 0.1) -> AsyncIterator[str]:
    """The job's state each time its status, steps or evaluations change, until an ``end`` event when it ends."""
    seen = None

    def poll() -> tuple[list[str], bool]:
        nonlocal seen
        state = (job.status, job.steps_done, len(job.evals))
        if state == seen:
            return [], False
        seen = state
        name = "end" if job.status.finished else "status"
        return [f"event: {name}\ndata: {JobOut.of(job).model_dump_json()}\n\n"], job.status.finished

    return polled(poll, poll_s)


@router.post("/jobs/{job_id}/cancel")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def cancel_job(job: PathJob, mezo: Context) -> JobOut:
    """Cancel a queued job now, a running one at its next chunk boundary."""
    return JobOut.of(mezo.runner.cancel(job.id))


@router.get("/jobs/{job_id}/trajectory")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def trajectory(job: PathJob) -> dict:
    """The job's fine-tune: its seeds and projected gradients (the trajectory format of
    :mod:`sglang_mezo.core.trajectory`), which replay onto the base checkpoint."""
    if job.trajectory is None:
        raise Conflict(f"job {job.id} has no committed step yet")
    return job.trajectory.to_dict()
