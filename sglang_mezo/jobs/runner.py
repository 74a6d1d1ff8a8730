"""Jobs and the runner that trains them one at a time, in chunks of steps, between user requests.

One job trains at a time; later submissions wait in a FIFO queue (status ``queued``). A job's steps are sent to
the scheduler in chunks sized so that a chunk takes about ``chunk_target_s`` (``--mezo-chunk-ms``). After each
chunk the runner waits until the user requests in flight at that moment have finished (at most ``yield_s``,
``--mezo-yield-ms``): a request that arrives during a chunk waits for that chunk alone and is then served to its
end, decode included, so a long job never starves traffic, and traffic that keeps arriving never starves the job.
Cancellation takes effect at the next chunk boundary.

The runner also keeps what the served weights *are*: the base checkpoint plus the trajectories of the jobs that
ran, in order (:attr:`JobRunner.served`). A reset replaces that history with a prefix of it; when a weight pass
failed part-way, the runner restores the weights to the history at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from pathlib import Path

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import EvalMetrics, Objective, evaluate, generation_metrics, scoring_items
from sglang_mezo.core.spsa import AbortedProbes, StepResult
from sglang_mezo.core.trajectory import Trajectory

from .executor import ChunkExecutor, ServedScorer, StepChunk, example_from_wire, weight_version_label

logger = logging.getLogger(__name__)

PROVENANCE = "mezo_history.json"
"""Written next to saved weights: the base model, the weight version, and the trajectories that lead there."""


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
    eval_examples: list[dict] = field(default_factory=list)
    """Held-out examples evaluated before the first step, every ``eval_every`` steps and after the last."""
    eval_every: int = 0
    eval_generate: bool = False
    """Also generate for completion eval examples and report exact match and token F1."""
    purpose: str = "train"
    """``train``, or ``diagnose`` for the lr = 0 probes of POST /mezo/diagnose (metrics leave those out)."""

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


@dataclass(frozen=True)
class ServedSegment:
    """One job's part of the served weights: its trajectory, or the first steps of it after a reset."""

    job_id: str
    trajectory: Trajectory

    @property
    def steps(self) -> int:
        return self.trajectory.committed_steps

    @property
    def weight_version(self) -> str:
        """The label of the weights after this segment (one label per bit-exact state)."""
        records = self.trajectory.records
        return weight_version_label(self.job_id, self.steps, bool(records) and not records[-1].committed)


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
    evals: list[dict] = field(default_factory=list)
    """``{"step", "n", "loss", "accuracy", "exact_match", "f1", "weight_version"}`` per evaluation."""
    _stats: tuple[int, dict] | None = field(default=None, repr=False)
    served_before: list[ServedSegment] = field(default_factory=list)
    """What the served weights carried when this job started: its steps apply on top of that."""
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

    def grad_stats(self) -> dict:
        """Zero-gradient counts and |g| quantiles (min, p10, p50, p90, max; nearest rank) of the steps so far,
        computed once per new step (status requests, SSE streams and job lists ask often)."""
        if self._stats is None or self._stats[0] != self.steps_done:
            grads = sorted(abs(g) for r in self.history for g in r["projected_grads"])
            zero = sum(1 for g in grads if g == 0.0)
            at = lambda q: grads[min(len(grads) - 1, int(q * len(grads)))]  # noqa: E731
            self._stats = (self.steps_done, {
                "zero_grad_steps": sum(1 for r in self.history if all(g == 0.0 for g in r["projected_grads"])),
                "zero_grad_rate": zero / len(grads) if grads else 0.0,
                "abs_grad_quantiles": {"min": grads[0], "p10": at(0.1), "p50": at(0.5), "p90": at(0.9),
                                       "max": grads[-1]} if grads else {},
            })
        return self._stats[1]

    @property
    def best_eval(self) -> dict | None:
        """The evaluation with the highest accuracy (choice examples), else the highest F1 (generation evaluated),
        else the lowest loss; ties go to the lower loss, then to the earlier step."""
        if not self.evals:
            return None

        def quality(e: dict) -> float:
            for metric in ("accuracy", "f1"):
                if e.get(metric) is not None:
                    return e[metric]
            return -e["loss"]

        return max(self.evals, key=lambda e: (quality(e), -e["loss"], -e["step"]))

    def record(self, results: list[dict], fingerprint: str, names: list[str], aborted: dict | None = None) -> None:
        """Add a chunk's committed steps (and the probe passes of a step that failed) to the trajectory."""
        if not results and aborted is None:
            return
        if self.trajectory is None:
            cfg = self.spec.config
            self.trajectory = Trajectory(z_kind=cfg.z_kind, trainable_fingerprint=fingerprint,
                                         trainable_names=list(names), config=cfg.to_dict(),
                                         base_model=self.spec.base_model)
        for r in results:
            self.trajectory.append(r["step"], StepResult.from_dict(r))
            self.history.append(r)
        if aborted is not None:
            self.trajectory.append_aborted(aborted["step"], AbortedProbes(
                seeds=tuple(aborted["seeds"]), eps=aborted["eps"], passes=aborted["passes"]))


class Busy(RuntimeError):
    """The served weights cannot be reset or saved now (a job is queued or running, or they are at no committed
    step)."""


class JobObserver(Protocol):
    """Told about a job's progress (metrics, logs); must not raise or block."""

    def on_steps(self, job: Job, results: list[dict]) -> None: ...

    def on_eval(self, job: Job, evaluation: dict) -> None: ...

    def on_finish(self, job: Job) -> None: ...


class JobRunner:
    def __init__(self, executor: ChunkExecutor, *, chunk_target_s: float = 0.2, max_chunk_steps: int = 64,
                 yield_s: float = 2.0, base_weight_version: str = "default", base_model: str = "",
                 scorer: ServedScorer | None = None, observers: Sequence[JobObserver] = ()) -> None:
        self.executor = executor
        self.observers = list(observers)
        self.scorer = scorer
        self.base_model = base_model
        self.base_weight_version = base_weight_version
        self.chunk_target_s = chunk_target_s
        self.yield_s = yield_s
        self.max_chunk_steps = max_chunk_steps
        self.jobs: dict[str, Job] = {}
        self.served: list[ServedSegment] = []
        """The served weights = the base checkpoint + these trajectories, replayed in order."""
        self.weights_lost = False
        """A weight pass failed part-way and the restore failed too: the weights are at no known state."""
        self._weights_lock = asyncio.Lock()
        """Held by a running job and by a reset: a job starts on the weights a reset left, never during one."""
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

    @property
    def weight_version(self) -> str:
        """SGLang's label of the weights served now: that of the last segment of the served history (the same label
        the scheduler gives them at each commit and restore)."""
        return self.served[-1].weight_version if self.served else self.base_weight_version

    async def reset(self, job_id: str | None = None, step: int | None = None) -> str:
        """Put the served weights at the base checkpoint (no ``job_id``), or at the weights right after ``step``
        committed steps of job ``job_id`` (all it committed if ``step`` is None): what the server held before that
        job started, plus those steps. Any job this server ran can be returned to, also one a later reset dropped.
        Works by re-reading the trainable tensors and replaying that history exactly. Raises :class:`Busy` while
        a job is queued or running, KeyError for an unknown job, ValueError for a step the job does not have."""
        if any(not j.status.finished for j in self.jobs.values()):
            raise Busy("a MeZO job is queued or running: cancel it or wait for it before a reset")
        async with self._weights_lock:
            return await self._restore(self._history_for(job_id, step))

    def _history_for(self, job_id: str | None, step: int | None) -> list[ServedSegment]:
        history: list[ServedSegment] = []
        if job_id is not None:
            job = self.jobs[job_id]
            committed = job.trajectory.committed_steps if job.trajectory is not None else 0
            if step is not None and not 0 <= step <= committed:
                raise ValueError(f"job {job_id} has {committed} committed steps; cannot reset to step {step}")
            history = list(job.served_before)
            if job.trajectory is not None and step != 0:
                kept = job.trajectory
                if step is not None:  # a copy with the records before that step; the job's own stays whole
                    kept = dataclasses.replace(kept, records=[r for r in kept.records if r.step < step])
                history.append(ServedSegment(job_id, kept))
        return history

    async def save(self, path: str) -> dict:
        """Write the served weights to ``path`` (a folder) as a Hugging Face checkpoint that transformers and SGLang
        load, plus ``mezo_history.json``: the trajectories that lead from the base checkpoint to them. Returns the
        scheduler's report (``weight_version``, ``tensors``). Raises RuntimeError if it failed."""
        if self.weights_lost:
            raise Busy("the served weights are at no committed step (a restore failed): reset them first")
        outcome = await self.executor.save(path)
        if not outcome.success:
            raise RuntimeError(f"saving the weights failed: {outcome.message}")
        # the served history as of the save: the scheduler handles messages in order, and a running job's
        # history may have moved on since; the label written by the scheduler says which weights these are
        version = outcome.info.get("weight_version", "")
        history = self._history_at(version)
        provenance = {"base_model": self.base_model, "weight_version": version,
                      "history": None if history is None else [s.trajectory.to_dict() for s in history]}
        Path(path, PROVENANCE).write_text(json.dumps(provenance))
        return {**outcome.info, "message": outcome.message}

    def _history_at(self, version: str) -> list[ServedSegment] | None:
        """The served history whose weights carry ``version`` (None if it is not the current one or a prefix)."""
        if version == self.base_weight_version:
            return []
        for n, segment in enumerate(self.served):
            if segment.weight_version == version:
                return self.served[: n + 1]
        return None

    async def _restore(self, history: list[ServedSegment]) -> str:
        version = history[-1].weight_version if history else self.base_weight_version
        outcome = await self.executor.restore([segment.trajectory.to_dict() for segment in history], version)
        if not outcome.success:
            self.weights_lost = outcome.inconsistent
            raise RuntimeError(f"restoring the weights failed: {outcome.message}")
        self.served, self.weights_lost = list(history), False
        return outcome.message

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            if job.status is JobStatus.QUEUED:
                try:
                    async with self._weights_lock:
                        await self._run(job)
                except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the queue
                    logger.exception("MeZO job %s crashed", job.id)
                    job.error = f"{type(exc).__name__}: {exc}"
                    self._finish(job, JobStatus.FAILED)

    async def _run(self, job: Job) -> None:
        spec = job.spec
        job.status, job.started = JobStatus.RUNNING, time.time()
        job.served_before = list(self.served)
        await self._evaluate(job)
        chunk_steps = 1
        while job.steps_done < spec.steps:
            if job.cancel_requested:
                self._finish(job, JobStatus.CANCELLED)
                return
            end = min(spec.steps, job.steps_done + chunk_steps)
            if spec.eval_every:  # a chunk ends where an evaluation is due
                end = min(end, (job.steps_done // spec.eval_every + 1) * spec.eval_every)
            steps = list(range(job.steps_done, end))
            picks = step_batches(len(spec.examples), spec.batch_size, spec.config.seed, steps)
            chunk = StepChunk(job_id=job.id, config=spec.config.to_dict(), objective=spec.objective.value,
                              steps=steps, batches=[[spec.examples[i] for i in pick] for pick in picks])
            started = time.perf_counter()
            outcome = await self.executor.run_chunk(chunk)
            per_step = (time.perf_counter() - started) / max(1, len(outcome.results))
            job.record(outcome.results, outcome.trainable_fingerprint, outcome.trainable_names, outcome.aborted)
            self._notify("on_steps", job, outcome.results)
            if job.trajectory is not None and not any(s.trajectory is job.trajectory for s in self.served):
                self.served.append(ServedSegment(job.id, job.trajectory))
            if not outcome.success:
                job.error = outcome.message
                if outcome.inconsistent:
                    job.error += "; " + await self._recover()
                job.inconsistent_weights = self.weights_lost
                self._finish(job, JobStatus.FAILED)
                return
            chunk_steps = max(1, min(self.max_chunk_steps, int(self.chunk_target_s / max(per_step, 1e-6))))
            if job.steps_done == spec.steps or (spec.eval_every and job.steps_done % spec.eval_every == 0):
                await self._evaluate(job)
            if job.steps_done < spec.steps and self.yield_s > 0:
                await self.executor.drain(self.yield_s)
        self._finish(job, JobStatus.SUCCEEDED)

    async def evaluate(self, objective: Objective, examples: list[dict],
                       generate: bool = False) -> tuple[EvalMetrics, str]:
        """Score ``examples`` as user traffic is served now; the metrics and the weight version that gave them
        (versions joined by ``,`` if a running job committed a step meanwhile). With ``generate``, completion
        examples also get the exact match and token F1 of greedy generations."""
        if self.scorer is None:
            raise RuntimeError("this runner has no scorer for evaluation")
        batch = [example_from_wire(e) for e in examples]
        items = scoring_items(batch)
        scores, versions = await self.scorer.score(items)
        metrics = evaluate(objective, batch, scores)
        if generate and objective is Objective.CROSS_ENTROPY:
            pairs = await self.scorer.generate(items)
            metrics = generation_metrics(metrics, [p for p, _ in pairs], [r for _, r in pairs])
        return metrics, ",".join(sorted(versions))

    async def _evaluate(self, job: Job) -> None:
        spec = job.spec
        if not spec.eval_examples:
            return
        metrics, version = await self.evaluate(spec.objective, spec.eval_examples, spec.eval_generate)
        job.evals.append({"step": job.steps_done, **metrics.to_dict(), "weight_version": version})
        self._notify("on_eval", job, job.evals[-1])
        logger.info("MeZO job %s: eval at step %d: %s", job.id, job.steps_done, metrics)

    async def _recover(self) -> str:
        """After a weight pass failed part-way: back to the last committed step, exactly."""
        logger.warning("MeZO: restoring the weights after a failed weight pass")
        try:
            return "the weights were restored to the last committed step: " + await self._restore(self.served)
        except Exception as exc:  # noqa: BLE001 - reported in the job and in /mezo/weights
            logger.error("MeZO: %s", exc)
            return f"{exc}; training stays disabled until POST /mezo/reset succeeds"

    def _finish(self, job: Job, status: JobStatus) -> None:
        job.status, job.finished = status, time.time()
        job.done.set()
        self._notify("on_finish", job)

    def _notify(self, event: str, *args) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:  # noqa: BLE001 - telemetry must never stop training
                logger.exception("MeZO: observer %s failed on %s", type(observer).__name__, event)
