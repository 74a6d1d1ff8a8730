"""The job queue: one job trains at a time, in chunks of steps, between user requests.

Later submissions wait in a FIFO queue (status ``queued``). A job's steps are sent to the executor in chunks sized
so that a chunk takes about ``chunk_target_s`` (``--mezo-chunk-ms``). After each chunk the runner waits until the
user requests in flight at that moment have finished (at most ``yield_s``, ``--mezo-yield-ms``): a request that
arrives during a chunk waits for that chunk alone and is then served to its end, decode included, so a long job
never starves traffic, and traffic that keeps arriving never starves the job. Cancellation takes effect at the
next chunk boundary. What the served weights are, and resets and saves of them, live in :mod:`.served`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from sglang_mezo.core.objectives import (
    EvalMetrics,
    Example,
    Objective,
    PreferenceExample,
    scoring_items,
    with_references,
)
from sglang_mezo.protocol import ChunkExecutor, Failure, FailureKind, ServedScorer, StepChunk, StepReport

from .errors import Conflict, InvalidRequest, NotFound, TooMany, Unavailable
from .evaluation import evaluate_served
from .job import Evaluation, Job, JobStatus
from .journal import Journal, JournalState, JournalWriteError
from .served import ServedSegment, ServedWeights
from .spec import JobSpec, Purpose

logger = logging.getLogger(__name__)


class JobObserver(Protocol):
    """Told about a job's progress (metrics, logs); must not raise or block."""

    def on_start(self, job: Job) -> None:
        """The job holds the weights now (before DPO's reference scores, its first evaluation and its first step)."""

    def on_steps(self, job: Job, reports: Sequence[StepReport]) -> None: ...

    def on_eval(self, job: Job, evaluation: Evaluation) -> None: ...

    def on_finish(self, job: Job) -> None: ...


class JobRunner:
    def __init__(self, executor: ChunkExecutor, scorer: ServedScorer, *, chunk_target_s: float = 0.2,
                 max_chunk_steps: int = 64, yield_s: float = 2.0, base_weight_version: str = "default",
                 base_model: str = "", observers: Sequence[JobObserver] = (), max_active: int | None = None,
                 journal: Journal | None = None, journaled: JournalState | None = None,
                 max_adapter_jobs: int = 4) -> None:
        """``journal``: where to keep the served history and the jobs as they happen (``--mezo-state-dir``);
        ``journaled``: what it held at launch (the scheduler has replayed its served history onto the weights)."""
        self.executor = executor
        self.scorer = scorer
        self.observers = list(observers)
        self.chunk_target_s = chunk_target_s
        self.yield_s = yield_s
        self.max_chunk_steps = max_chunk_steps
        self.max_active = max_active
        """Jobs queued or running at once (``--mezo-max-queued-jobs``); None: no bound."""
        self.jobs: dict[str, Job] = {}
        self.max_adapter_jobs = max_adapter_jobs
        """Adapter jobs training at once (``--mezo-max-adapter-jobs``): each runs beside the others and beside the
        queue, since none moves the served weights."""
        self._adapter_tasks: set[asyncio.Task] = set()
        self.journal = journal
        self.weights = ServedWeights(executor, base_weight_version=base_weight_version, base_model=base_model,
                                     journal=journal)
        if journaled is not None:
            self._restore_from(journaled, base_model)
        self._queue: asyncio.Queue[Job] | None = None
        self._worker: asyncio.Task | None = None

    # -- the queue -------------------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> Job:
        """Queue a job; the worker task starts on the running event loop at the first submission."""
        if self.weights.lost:
            raise Conflict("the served weights are at no committed step (a restore failed): POST /mezo/reset first")
        if self.journal is not None and self.journal.failed:
            raise Unavailable(f"{self.journal.failed}: restart the server with a writable --mezo-state-dir")
        active = sum(1 for j in self.jobs.values() if not j.status.finished)
        if self.max_active is not None and active >= self.max_active:
            raise TooMany(f"{active} jobs are queued or running; this server queues at most {self.max_active} "
                          f"(--mezo-max-queued-jobs)")
        if spec.adapter is not None:
            return self._start_adapter_job(spec)
        if self._adapter_jobs():
            raise Conflict(f"adapter jobs are training ({', '.join(j.id for j in self._adapter_jobs())}) on the "
                           "served weights: a job on the weights themselves would change the base under them; "
                           "cancel them or wait for them first")
        job = Job(spec)
        self.jobs[job.id] = job
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="sglang-mezo-jobs")
        self._queue.put_nowait(job)
        return job

    def _adapter_jobs(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.spec.adapter is not None and not j.status.finished]

    def _start_adapter_job(self, spec: JobSpec) -> Job:
        """An adapter job starts at once, beside the queue (the served weights' lock is not its to take), up to
        ``max_adapter_jobs`` at a time and one per adapter name."""
        assert spec.adapter is not None
        running = self._adapter_jobs()
        if any(j.spec.adapter.name == spec.adapter.name for j in running):
            raise Conflict(f"adapter {spec.adapter.name!r} is being trained by another job")
        if len(running) >= self.max_adapter_jobs:
            raise TooMany(f"{len(running)} adapter jobs are training; this server trains at most "
                          f"{self.max_adapter_jobs} at once (--mezo-max-adapter-jobs)")
        if any(not j.status.finished for j in self.jobs.values() if j.spec.adapter is None):
            raise Conflict("a job on the served weights is queued or running: an adapter trained meanwhile would "
                           "be trained on a moving base; wait for it or cancel it first")
        job = Job(spec)
        self.jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(self._adapter_work(job), name=f"sglang-mezo-{job.id}")
        self._adapter_tasks.add(task)
        task.add_done_callback(self._adapter_tasks.discard)
        return job

    async def _adapter_work(self, job: Job) -> None:
        if job.status is not JobStatus.QUEUED:  # cancelled before it started
            return
        try:
            await self._run(job)
        except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the others
            logger.exception("MeZO job %s crashed", job.id)
            job.failure = Failure(FailureKind.INTERNAL, f"{type(exc).__name__}: {exc}")
            self._finish(job, JobStatus.FAILED)
        finally:
            await self.executor.end_adapter_job(job.id)

    def adapter(self, name: str) -> Job:
        """The job whose version of adapter ``name`` is served now (404 if no job of this server published one)."""
        jobs = [j for j in self.jobs.values()
                if j.spec.adapter is not None and j.spec.adapter.name == name and j.adapter_version is not None]
        if not jobs:
            raise NotFound(f"no job of this server has committed a step of adapter {name!r}")
        return max(jobs, key=lambda j: j.created)

    def adapter_names(self) -> list[str]:
        """The adapters this server's jobs trained and serve (a committed step each), in the order they began."""
        return list(dict.fromkeys(j.spec.adapter.name for j in sorted(self.jobs.values(), key=lambda j: j.created)
                                  if j.spec.adapter is not None and j.adapter_version is not None))

    def _restore_from(self, state: JournalState, base_model: str) -> None:
        """The jobs and served history of a journal, as this runner would have left them."""
        for entry in state.jobs.values():
            job = Job(JobSpec(examples=(), objective=entry.objective, config=entry.config,
                              batch_size=entry.batch_size, base_model=base_model, purpose=Purpose(entry.purpose),
                              adapter=entry.adapter),
                      id=entry.id, status=JobStatus(entry.status), created=entry.created, started=entry.started,
                      finished=entry.finished, failure=entry.failure, trajectory=entry.trajectory,
                      reports=list(entry.reports), evals=[Evaluation(*e) for e in entry.evals],
                      served_before=tuple(ServedSegment(*s) for s in state.history(entry.served_before)),
                      adapter_version=entry.adapter_version, trained_on=entry.trained_on)
            job.done.set()
            self.jobs[job.id] = job
        self.weights.segments = [ServedSegment(*s) for s in state.history()]

    def job(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise NotFound(f"no job {job_id!r}")
        return self.jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        job = self.job(job_id)
        if job.status is JobStatus.QUEUED:
            self._finish(job, JobStatus.CANCELLED)
        elif job.status is JobStatus.RUNNING:
            job.cancel_requested = True
        return job

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            if job.status is not JobStatus.QUEUED:
                continue
            try:
                async with self.weights.lock:
                    await self._run(job)
            except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the queue
                logger.exception("MeZO job %s crashed", job.id)
                job.failure = Failure(FailureKind.INTERNAL, f"{type(exc).__name__}: {exc}")
                self._finish(job, JobStatus.FAILED)

    # -- one job, chunk by chunk -------------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        spec = job.spec
        job.status, job.started = JobStatus.RUNNING, time.time()
        adapter = spec.adapter is not None
        if not adapter:  # the replicas that share its steps are those there now (a fleet's members change)
            shards = await self.executor.replicas()
            if shards != spec.config.shards:
                job.spec = spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, shards=shards))
        job.served_before = () if adapter else tuple(self.weights.segments)
        job.trained_on = self.weights.weight_version if adapter else ""
        self._notify("on_start", job)
        failure = await self._journaled(lambda journal: journal.job_started(
            job.id, spec.config, spec.objective, spec.batch_size, spec.purpose.value, job.created,
            [s.journaled() for s in job.served_before], spec.adapter, job.trained_on))
        if failure is not None:
            return await self._fail(job, failure, recover=False)
        if spec.objective is Objective.DPO:
            job.spec = spec = await self._with_references(spec)
        await self._evaluate(job)
        chunk_steps = 1
        while job.steps_done < spec.steps:
            if job.cancel_requested:
                return self._finish(job, JobStatus.CANCELLED)
            steps = self._next_steps(job, chunk_steps)
            started = time.perf_counter()
            outcome = await self.executor.run_chunk(StepChunk(job_id=job.id, config=spec.config,
                                                              objective=spec.objective, steps=steps,
                                                              batches=spec.batches(steps), adaptive=job.adaptive,
                                                              adapter=spec.adapter))
            per_step = (time.perf_counter() - started) / max(1, len(outcome.reports))
            # on disk before anything here learns of the steps: a status that shows step k survives a restart
            unjournaled = await self._journaled(lambda journal: journal.chunk(job.id, outcome, spec.config.z_kind))
            job.record(outcome)
            self._notify("on_steps", job, outcome.reports)
            if job.trajectory is not None and not adapter:
                self.weights.carry(job.id, job.trajectory)
            if outcome.failure is not None or unjournaled is not None:
                return await self._fail(job, outcome.failure or unjournaled,
                                        recover=not outcome.weights_consistent)
            chunk_steps = max(1, min(self.max_chunk_steps, int(self.chunk_target_s / max(per_step, 1e-6))))
            if job.steps_done == spec.steps or (spec.eval_every and job.steps_done % spec.eval_every == 0):
                await self._evaluate(job)
            # an adapter chunk holds the scheduler thread as a full-weight chunk does (without retracting anyone):
            # the requests in flight get their turn before the next one, or a decode would advance one token a chunk
            if job.steps_done < spec.steps and self.yield_s > 0:
                await self.executor.drain(self.yield_s)
        self._finish(job, JobStatus.SUCCEEDED)

    async def _with_references(self, spec: JobSpec) -> JobSpec:
        """DPO's reference model is the one the job starts from: the served weights now, under the weights' lock
        (nothing else can step them), scored once for every pair the job has."""

        async def measured(examples: Sequence[PreferenceExample]) -> tuple[PreferenceExample, ...]:
            if not examples or all(e.reference is not None for e in examples):
                return tuple(examples)
            scores, _ = await self.scorer.score(scoring_items(examples))
            return with_references(examples, scores)

        return dataclasses.replace(spec, examples=await measured(spec.examples),
                                   eval_examples=await measured(spec.eval_examples))

    async def _journaled(self, write: Callable[[Journal], None]) -> Failure | None:
        """A journal write, off the event loop (it fsyncs); why training must stop, if it could not be written."""
        if self.journal is None:
            return None
        try:
            await asyncio.to_thread(write, self.journal)
        except JournalWriteError as exc:
            logger.error("MeZO: %s", exc)
            return Failure(FailureKind.INTERNAL, f"{exc}: steps from now on would not survive a restart, so "
                                                 "training stops until the server restarts with a writable "
                                                 "--mezo-state-dir")
        return None

    @staticmethod
    def _next_steps(job: Job, chunk_steps: int) -> tuple[int, ...]:
        """The next chunk's steps: ``chunk_steps`` of them, ending early where an evaluation is due."""
        spec = job.spec
        end = min(spec.steps, job.steps_done + chunk_steps)
        if spec.eval_every:
            end = min(end, (job.steps_done // spec.eval_every + 1) * spec.eval_every)
        return tuple(range(job.steps_done, end))

    async def _fail(self, job: Job, failure: Failure, *, recover: bool) -> None:
        if recover:
            failure = dataclasses.replace(failure, message=f"{failure.message}; {await self.weights.recover()}")
        job.failure = failure
        job.weights_lost = self.weights.lost
        self._finish(job, JobStatus.FAILED)

    def _finish(self, job: Job, status: JobStatus) -> None:
        job.status, job.finished = status, time.time()
        if self.journal is not None and job.started is not None:
            try:
                self.journal.finished(job.id, status.value, job.failure)
            except JournalWriteError:  # the job is over either way; a restart will list it as interrupted
                logger.exception("MeZO: could not journal the end of job %s", job.id)
        job.done.set()
        self._notify("on_finish", job)

    # -- evaluation ------------------------------------------------------------------------------------------------

    async def evaluate(self, objective: Objective, examples: Sequence[Example],
                       generate: bool = False) -> tuple[EvalMetrics, str]:
        """Score ``examples`` as user traffic is served now (see :func:`.evaluation.evaluate_served`)."""
        if self.weights.lost:
            raise Conflict("the served weights are at no committed step (a restore failed): POST /mezo/reset first")
        return await evaluate_served(self.scorer, objective, examples, generate)

    async def _evaluate(self, job: Job) -> None:
        spec = job.spec
        if not spec.eval_examples:
            return
        scorer = self.scorer if spec.adapter is None else self.scorer.under(spec.adapter.name)
        metrics, version = await evaluate_served(scorer, spec.objective, spec.eval_examples,
                                                 spec.eval_generate)
        job.evals.append(Evaluation(job.steps_done, metrics, version))
        await self._journaled(lambda journal: journal.evaluated(job.id, job.steps_done, metrics, version))
        self._notify("on_eval", job, job.evals[-1])
        logger.info("MeZO job %s: eval at step %d: %s", job.id, job.steps_done, metrics)

    # -- resets ----------------------------------------------------------------------------------------------------

    async def reset(self, job_id: str | None = None, step: int | None = None) -> str:
        """Put the served weights at the base checkpoint (no ``job_id``), or at the weights right after ``step``
        committed steps of job ``job_id`` (all it committed if ``step`` is None): what the server held before that
        job started, plus those steps. Any job this server ran can be returned to, also one a later reset dropped.
        Works by re-reading the trainable tensors and replaying that history exactly."""
        if any(not j.status.finished for j in self.jobs.values()):
            raise Conflict("a MeZO job is queued or running (adapter jobs included, whose base a reset would change): "
                           "cancel it or wait for it before a reset")
        async with self.weights.lock:
            return await self.weights.restore(self.history_for(job_id, step))

    def history_for(self, job_id: str | None, step: int | None) -> list[ServedSegment]:
        """The served history right after ``step`` committed steps of job ``job_id`` (the base: no job)."""
        if job_id is None:
            if step is not None:
                raise InvalidRequest("step needs a job_id")
            return []
        if job_id not in self.jobs:
            raise NotFound(f"the served weights carry no job {job_id!r}")
        job = self.jobs[job_id]
        committed = job.trajectory.committed_steps if job.trajectory is not None else 0
        if step is not None and not 0 <= step <= committed:
            raise InvalidRequest(f"job {job_id} has {committed} committed steps; cannot reset to step {step}")
        history = list(job.served_before)
        if job.trajectory is not None and step != 0:
            history.append(ServedSegment(job_id, job.trajectory if step is None else job.trajectory.upto(step)))
        return history

    def _notify(self, event: str, *args) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:  # noqa: BLE001 - telemetry must never stop training
                logger.exception("MeZO: observer %s failed on %s", type(observer).__name__, event)
