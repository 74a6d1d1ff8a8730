"""MeZO metrics on SGLang's Prometheus endpoint (``/metrics``, with ``--enable-metrics``).

SGLang serves the metrics of all its processes through prometheus_client's multiprocess mode; these are created
in the HTTP process, where the job runner lives, after SGLang has set up the multiprocess directory.
"""

from __future__ import annotations

from collections.abc import Sequence

from sglang_mezo.jobs.job import Evaluation, Job
from sglang_mezo.jobs.spec import Purpose
from sglang_mezo.protocol import StepReport

_PREFIX = "sglang_mezo_"


class PrometheusObserver:
    """Receives the runner's job events and updates the metrics."""

    def __init__(self, labels: dict[str, str] | None = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.labels = dict(labels or {})
        names = list(self.labels)
        self.steps = Counter(_PREFIX + "steps", "Committed MeZO steps", names)
        self.probes = Counter(_PREFIX + "probes", "SPSA probes of committed steps", names)
        self.zero_grad_probes = Counter(_PREFIX + "zero_grad_probes", "Probes whose L+ equalled L- (no signal)",
                                        names)
        self.step_seconds = Histogram(_PREFIX + "step_seconds", "Time of one step in the scheduler (user requests "
                                      "wait meanwhile)", names,
                                      buckets=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0))
        self.loss = Gauge(_PREFIX + "loss", "The last committed step's loss estimate", names,
                          multiprocess_mode="mostrecent")
        self.eval_loss = Gauge(_PREFIX + "eval_loss", "The last evaluation's loss", names,
                               multiprocess_mode="mostrecent")
        self.eval_accuracy = Gauge(_PREFIX + "eval_accuracy", "The last evaluation's accuracy (choice examples)",
                                   names, multiprocess_mode="mostrecent")
        self.jobs = Counter(_PREFIX + "jobs", "Finished MeZO jobs, by outcome", [*names, "status"])

    def on_start(self, job: Job) -> None:
        pass  # a job's start is in its status; the metrics count its steps and its end

    def on_steps(self, job: Job, reports: Sequence[StepReport]) -> None:
        if job.spec.purpose is not Purpose.TRAIN:  # the diagnostic's lr = 0 probes are not training
            return
        for report in reports:
            self.steps.labels(**self.labels).inc()
            self.probes.labels(**self.labels).inc(len(report.result.projected_grads))
            self.zero_grad_probes.labels(**self.labels).inc(report.result.zero_grad_probes)
            self.step_seconds.labels(**self.labels).observe(report.step_ms / 1e3)
        if reports:
            self.loss.labels(**self.labels).set(reports[-1].result.loss)

    def on_eval(self, job: Job, evaluation: Evaluation) -> None:
        self.eval_loss.labels(**self.labels).set(evaluation.metrics.loss)
        if evaluation.metrics.accuracy is not None:
            self.eval_accuracy.labels(**self.labels).set(evaluation.metrics.accuracy)

    def on_finish(self, job: Job) -> None:
        if job.spec.purpose is not Purpose.TRAIN:
            return
        self.jobs.labels(**self.labels, status=job.status.value).inc()
