"""What a finished OpenAI fine-tuning job reports from its MeZO job: validation metrics under OpenAI's names, the
per-step metrics file, the tokens trained on."""

from __future__ import annotations

import csv
import io

from sglang_mezo.jobs.job import Evaluation, Job


def valid_metrics(evaluation: Evaluation) -> dict[str, float | None]:
    """OpenAI's names; the whole validation file is evaluated each time, so ``valid_loss`` is ``full_valid_loss``.
    ``valid_accuracy`` is ours (choice examples' accuracy; OpenAI's token accuracy is not measured)."""
    m = evaluation.metrics
    return {"valid_loss": m.loss, "full_valid_loss": m.loss, "valid_accuracy": m.accuracy}


def metrics_csv(job: Job) -> bytes:
    """One row per committed step: OpenAI's ``step,train_loss,…`` columns, the validation ones where an evaluation
    followed that step."""
    evals = {e.step: e.metrics for e in job.evals}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "train_loss", "valid_loss", "valid_accuracy", "step_ms"])
    for report in job.reports:
        step = report.step + 1
        valid = evals.get(step)
        writer.writerow([step, report.result.loss, "" if valid is None else valid.loss,
                         "" if valid is None or valid.accuracy is None else valid.accuracy, round(report.step_ms, 3)])
    return out.getvalue().encode()


def trained_tokens(job: Job) -> int:
    """Tokens of the training examples the committed steps scored (each once, not once per probe)."""
    return sum(e.tokens for batch in job.spec.batches(range(job.steps_done)) for e in batch)
