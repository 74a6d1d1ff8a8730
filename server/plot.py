"""A job's curves as a PNG: the probes' L+ and L- with their mean per step, and the held-out evaluations."""

from __future__ import annotations

import io
import statistics

from sglang_mezo.jobs.job import Evaluation
from sglang_mezo.protocol import StepReport


def job_plot_png(job_id: str, reports: list[StepReport], evals: list[Evaluation]) -> bytes:
    """Render with matplotlib's Agg backend (no display; blocking: call it in a thread)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 6 if evals else 3.4), dpi=100)
    axes = figure.subplots(2 if evals else 1, 1, squeeze=False)[:, 0]
    steps = [r.step + 1 for r in reports]
    ax = axes[0]
    ax.plot(steps, [statistics.fmean(r.result.loss_plus) for r in reports], ".", ms=3, alpha=0.5,
            label="L+ (θ + εz)")
    ax.plot(steps, [statistics.fmean(r.result.loss_minus) for r in reports], ".", ms=3, alpha=0.5,
            label="L- (θ - εz)")
    ax.plot(steps, [r.result.loss for r in reports], "-", lw=1, label="mean")
    ax.set(title=f"MeZO job {job_id}", xlabel="step", ylabel="training loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[1]
        at = [e.step for e in evals]
        ax.plot(at, [e.metrics.loss for e in evals], "o-", label="held-out loss")
        ax.set(xlabel="step", ylabel="held-out loss")
        ax.grid(alpha=0.3)
        if all(e.metrics.accuracy is not None for e in evals):
            twin = ax.twinx()
            twin.plot(at, [e.metrics.accuracy for e in evals], "s--", color="tab:green", label="held-out accuracy")
            twin.set(ylabel="held-out accuracy", ylim=(0, 1))
            twin.legend(loc="lower right", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
