"""A job as it runs: its status, the steps it committed (and the trajectory they make), its evaluations and the
statistics of its gradient estimates."""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass, field

from sglang_mezo.core.estimators import INITIAL_STATE, AdaptiveState
from sglang_mezo.core.objectives import EvalMetrics
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.protocol import AdapterVersion, ChunkOutcome, Failure, StepReport

from .served import ServedSegment
from .spec import JobSpec


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
class Evaluation:
    """The held-out metrics of the weights after ``step`` committed steps, and SGLang's label of those weights
    (labels joined by ``,`` if a step committed while the examples were scored)."""

    step: int
    metrics: EvalMetrics
    weight_version: str

    @property
    def rank(self) -> tuple[float, float, int]:
        """What "best" means: the highest accuracy (choice examples), else the highest F1 (generation evaluated),
        else the lowest loss; ties go to the lower loss, then to the earlier step."""
        m = self.metrics
        quality = m.accuracy if m.accuracy is not None else m.f1 if m.f1 is not None else -m.loss
        return quality, -m.loss, -self.step


@dataclass(frozen=True)
class GradQuantiles:
    """|g| over a job's probes (nearest rank)."""

    min: float
    p10: float
    p50: float
    p90: float
    max: float


@dataclass(frozen=True)
class GradStats:
    zero_grad_steps: int = 0
    """Steps whose every probe had L+ = L- exactly (g = 0): no update."""
    zero_grad_rate: float = 0.0
    """The share of probes with g = 0."""
    abs_grad_quantiles: GradQuantiles | None = None

    @classmethod
    def of(cls, reports: list[StepReport]) -> GradStats:
        grads = sorted(abs(g) for r in reports for g in r.result.projected_grads)
        if not grads:
            return cls()
        at = lambda q: grads[min(len(grads) - 1, int(q * len(grads)))]  # noqa: E731
        return cls(
            zero_grad_steps=sum(1 for r in reports if r.result.zero_grad_probes == len(r.result.projected_grads)),
            zero_grad_rate=sum(r.result.zero_grad_probes for r in reports) / len(grads),
            abs_grad_quantiles=GradQuantiles(grads[0], at(0.1), at(0.5), at(0.9), grads[-1]),
        )


@dataclass
class Job:
    spec: JobSpec
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: JobStatus = JobStatus.QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    failure: Failure | None = None
    weights_lost: bool = False
    """The job failed in a way that left the served weights at no committed step, and they could not be restored."""
    cancel_requested: bool = False
    trajectory: Trajectory | None = None
    reports: list[StepReport] = field(default_factory=list)
    evals: list[Evaluation] = field(default_factory=list)
    served_before: tuple[ServedSegment, ...] = ()
    """What the served weights carried when this job started: its steps apply on top of that."""
    adapter_version: AdapterVersion | None = None
    """An adapter job's version served now under the adapter's name (its first ``committed_steps`` steps)."""
    trained_on: str = ""
    """An adapter job's base: the served weights' label when it started (an adapter trained on other weights than
    the ones served now still serves, on the new base)."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _stats: tuple[int, GradStats] = field(default=(0, GradStats()), repr=False)

    @property
    def steps_done(self) -> int:
        return len(self.reports)

    def elapsed_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def eta_s(self) -> float | None:
        if self.status is not JobStatus.RUNNING or not self.steps_done:
            return None
        return self.elapsed_s() / self.steps_done * (self.spec.steps - self.steps_done)

    def grad_stats(self) -> GradStats:
        """Computed once per new step: status requests, SSE streams and job lists ask often."""
        if self._stats[0] != self.steps_done:
            self._stats = (self.steps_done, GradStats.of(self.reports))
        return self._stats[1]

    @property
    def best_eval(self) -> Evaluation | None:
        """The evaluation ranked best (see :attr:`Evaluation.rank`)."""
        return max(self.evals, key=lambda e: e.rank, default=None)

    @property
    def adaptive(self) -> AdaptiveState:
        """The step-size rule's state after the last committed step: where the next chunk continues from."""
        return self.reports[-1].result.adaptive if self.reports else INITIAL_STATE

    @property
    def longest_step_ms(self) -> float:
        """The longest a user request waited for one step of this job."""
        return max((r.step_ms for r in self.reports), default=0.0)

    def record(self, outcome: ChunkOutcome) -> None:
        """Add a chunk's committed steps (and the probe passes of a step that failed) to the trajectory."""
        if not outcome.reports and outcome.aborted is None:
            return
        if self.trajectory is None:
            cfg = self.spec.config
            self.trajectory = Trajectory(z_kind=cfg.z_kind, trainable_fingerprint=outcome.trainable_fingerprint,
                                         trainable_names=list(outcome.trainable_names), config=cfg.to_dict(),
                                         base_model=self.spec.base_model,
                                         adapter=None if self.spec.adapter is None else
                                         self.spec.adapter.spec.to_dict())
        if outcome.adapter_version is not None:
            self.adapter_version = outcome.adapter_version
        for report in outcome.reports:
            self.trajectory.append(report.step, report.result)
            self.reports.append(report)
        if outcome.aborted is not None:
            self.trajectory.append_aborted(outcome.aborted.step, outcome.aborted.probes)
