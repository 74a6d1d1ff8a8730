"""The ε diagnostic: for each ε, SPSA probes of one batch with no update (lr = 0), to see whether the objective
gives a signal at that scale (an accuracy objective usually does not at small ε).

The probes run as ordinary jobs: they queue behind others, and their round trips are recorded, so the served
weights stay exactly described.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.estimators import Adaptive, Estimator
from sglang_mezo.core.objectives import Example, Objective

from .errors import Conflict, JobFailed
from .job import Job, JobStatus
from .runner import JobRunner
from .spec import JobSpec, Purpose


@dataclass(frozen=True)
class EpsDiagnosis:
    eps: float
    nonzero_rate: float
    """The share of probes with L+ != L- (a usable gradient estimate)."""
    median_abs_loss_diff: float
    """The median |L+ - L-| (upper median): how far above the loss's numerical noise a probe moves it."""
    median_abs_grad: float
    loss: float
    """The mean of L+ and L- over the probes (the batch's loss)."""
    job_id: str
    """The lr = 0 job that ran the probes."""

    @classmethod
    def of(cls, eps: float, job: Job) -> EpsDiagnosis:
        results = [r.result for r in job.reports]
        diffs = sorted(abs(p - m) for r in results for p, m in zip(r.loss_plus, r.loss_minus, strict=True))
        grads = sorted(abs(g) for r in results for g in r.projected_grads)
        return cls(eps=eps, nonzero_rate=sum(1 for d in diffs if d) / len(diffs),
                   median_abs_loss_diff=statistics.median_high(diffs), median_abs_grad=statistics.median_high(grads),
                   loss=statistics.fmean(r.loss for r in results), job_id=job.id)


async def diagnose(runner: JobRunner, defaults: MezoConfig, examples: Sequence[Example], objective: Objective, *,
                   eps: Sequence[float], probes: int, seed: int, base_model: str = "") -> list[EpsDiagnosis]:
    """``probes`` single-probe lr = 0 steps on the whole batch for each ε in turn."""
    out = []
    for e in eps:
        # two-sided SPSA whatever the defaults: L+ - L- is the signal this diagnostic measures
        config = dataclasses.replace(defaults, lr=0.0, eps=e, n_probes=1, weight_decay=0.0, total_steps=probes,
                                     seed=seed, estimator=Estimator.SPSA, adaptive=Adaptive.NONE)
        job = runner.submit(JobSpec(examples=tuple(examples), objective=objective, config=config,
                                    batch_size=len(examples), base_model=base_model, purpose=Purpose.DIAGNOSE))
        await job.done.wait()
        if job.status is JobStatus.CANCELLED:
            raise Conflict(f"the probes at eps={e} were cancelled")
        if job.status is not JobStatus.SUCCEEDED:
            assert job.failure is not None
            raise JobFailed(dataclasses.replace(job.failure, message=f"the probes at eps={e} stopped: "
                                                                     f"{job.failure.message}"))
        out.append(EpsDiagnosis.of(e, job))
    return out
