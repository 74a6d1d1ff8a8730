"""Jobs and the runner that trains them one at a time, in chunks of steps, between user requests.

One job trains at a time; later submissions wait in a FIFO queue (status ``queued``). A job's steps are sent to
the scheduler in chunks sized so that a chunk takes about ``chunk_target_s`` (``--mezo-chunk-ms``): user requests queued meanwhile are
served between chunks, so a long job never starves them. Cancellation takes effect at the next chunk boundary.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import Objective
from sglang_mezo.core.spsa import StepResult
from sglang_mezo.core.trajectory import Trajectory

from .executor import ChunkExecutor, StepChunk

logger = logging.getLogger(__name__)


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class JobSpec:
    """A validated, tokenized job. ``examples`` are wire dicts (see ``MezoChunkReqInput.batches``)."""

    examples: list[dict]
    objective: Objective
    config: MezoConfig
    batch_size: int
    base_model: str = ""

    @property
    def steps(self) -> int:
        return self.config.total_steps


def step_batches(n_examples: int, batch_size: int, seed: int, steps: Sequence[int]) -> list[list[int]]:
    """Example indices of each step: epochs of seeded shuffles, cut in consecutive batches (without replacement
    within an epoch; a batch larger than the data set takes every example)."""
    batch_size = min(batch_size, n_examples)
    per_epoch = n_examples // batch_size
    out = []
    for step in steps:
        epoch, slot = divmod(step, per_epoch)
        order = list(range(n_examples))
        random.Random(f"{seed}:{epoch}").shuffle(order)  # a string seed: stable across Python versions
        out.append(order[slot * batch_size : (slot + 1) * batch_size])
    return out


@dataclass
class Job:
    spec: JobSpec
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: JobStatus = JobStatus.QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    inconsistent_weights: bool = False
    cancel_requested: bool = False
    trajectory: Trajectory | None = None
    history: list[dict] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def steps_done(self) -> int:
        return len(self.history)

    def elapsed_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def eta_s(self) -> float | None:
        if self.status is not JobStatus.RUNNING or not self.steps_done:
            return None
        return self.elapsed_s() / self.steps_done * (self.spec.steps - self.steps_done)

    def record(self, results: list[dict], fingerprint: str, names: list[str]) -> None:
        if not results:
            return
        if self.trajectory is None:
            cfg = self.spec.config
            self.trajectory = Trajectory(z_kind=cfg.z_kind, trainable_fingerprint=fingerprint,
                                         trainable_names=list(names), config=cfg.to_dict(),
                                         base_model=self.spec.base_model)
        for r in results:
            self.trajectory.append(r["step"], StepResult.from_dict(r))
            self.history.append(r)


class JobRunner:
    def __init__(self, executor: ChunkExecutor, *, chunk_target_s: float = 0.2, max_chunk_steps: int = 64) -> None:
        self.executor = executor
        self.chunk_target_s = chunk_target_s
        self.max_chunk_steps = max_chunk_steps
        self.jobs: dict[str, Job] = {}
        self._queue: asyncio.Queue[Job] | None = None
        self._worker: asyncio.Task | None = None

    def submit(self, spec: JobSpec) -> Job:
        """Queue a job; the worker task starts on the running event loop at the first submission."""
        job = Job(spec)
        self.jobs[job.id] = job
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="sglang-mezo-jobs")
        self._queue.put_nowait(job)
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.jobs[job_id]
        if job.status is JobStatus.QUEUED:
            self._finish(job, JobStatus.CANCELLED)
        elif job.status is JobStatus.RUNNING:
            job.cancel_requested = True
        return job

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            if job.status is JobStatus.QUEUED:
                try:
                    await self._run(job)
                except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the queue
                    logger.exception("MeZO job %s crashed", job.id)
                    job.error = f"{type(exc).__name__}: {exc}"
                    self._finish(job, JobStatus.FAILED)

    async def _run(self, job: Job) -> None:
        spec = job.spec
        job.status, job.started = JobStatus.RUNNING, time.time()
        chunk_steps = 1
        while job.steps_done < spec.steps:
            if job.cancel_requested:
                self._finish(job, JobStatus.CANCELLED)
                return
            steps = list(range(job.steps_done, min(spec.steps, job.steps_done + chunk_steps)))
            picks = step_batches(len(spec.examples), spec.batch_size, spec.config.seed, steps)
            chunk = StepChunk(job_id=job.id, config=spec.config.to_dict(), objective=spec.objective.value,
                              steps=steps, batches=[[spec.examples[i] for i in pick] for pick in picks])
            started = time.perf_counter()
            outcome = await self.executor.run_chunk(chunk)
            per_step = (time.perf_counter() - started) / max(1, len(outcome.results))
            job.record(outcome.results, outcome.trainable_fingerprint, outcome.trainable_names)
            if not outcome.success:
                job.error = outcome.message
                job.inconsistent_weights = outcome.inconsistent
                self._finish(job, JobStatus.FAILED)
                return
            chunk_steps = max(1, min(self.max_chunk_steps, int(self.chunk_target_s / max(per_step, 1e-6))))
        self._finish(job, JobStatus.SUCCEEDED)

    @staticmethod
    def _finish(job: Job, status: JobStatus) -> None:
        job.status, job.finished = status, time.time()
        job.done.set()
