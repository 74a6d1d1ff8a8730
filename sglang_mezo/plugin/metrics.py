"""MeZO metrics on SGLang's Prometheus endpoint (``/metrics``, with ``--enable-metrics``).

SGLang serves the metrics of all its processes through prometheus_client's multiprocess mode; these are created
in the HTTP process, where the job runner lives, after SGLang has set up the multiprocess directory.
"""

from __future__ import annotations

from sglang_mezo.jobs.runner import Job

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

    def on_steps(self, job: Job, results: list[dict]) -> None:
        if job.spec.purpose != "train":  # the diagnostic's lr = 0 probes are not training
            return
        for r in results:
            grads = r["projected_grads"]
            self.steps.labels(**self.labels).inc()
            self.probes.labels(**self.labels).inc(len(grads))
            self.zero_grad_probes.labels(**self.labels).inc(sum(1 for g in grads if g == 0.0))
            self.step_seconds.labels(**self.labels).observe(r["step_ms"] / 1e3)
        if results:
            last = results[-1]
            self.loss.labels(**self.labels).set((sum(last["loss_plus"]) + sum(last["loss_minus"]))
                                                / (2 * len(last["loss_plus"])))

    def on_eval(self, job: Job, evaluation: dict) -> None:
        self.eval_loss.labels(**self.labels).set(evaluation["loss"])
        if evaluation["accuracy"] is not None:
            self.eval_accuracy.labels(**self.labels).set(evaluation["accuracy"])

    def on_finish(self, job: Job) -> None:
        if job.spec.purpose != "train":
            return
        self.jobs.labels(**self.labels, status=job.status.value).inc()
