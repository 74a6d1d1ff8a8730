"""Evaluating examples under the served weights, as user traffic is served (nothing changes)."""

from __future__ import annotations

from collections.abc import Sequence

from sglang_mezo.core.objectives import EvalMetrics, Example, Objective, evaluate, generation_metrics, scoring_items
from sglang_mezo.protocol import ServedScorer


async def evaluate_served(scorer: ServedScorer, objective: Objective, examples: Sequence[Example],
                          generate: bool = False) -> tuple[EvalMetrics, str]:
    """The metrics of ``examples`` and the weight version that gave them (versions joined by ``,`` if a running job
    committed a step meanwhile). With ``generate``, completion examples also get the exact match and token F1 of
    greedy generations."""
    items = scoring_items(examples)
    scores, versions = await scorer.score(items)
    metrics = evaluate(objective, examples, scores)
    if generate and objective is Objective.CROSS_ENTROPY:
        pairs = await scorer.generate(items)
        metrics = generation_metrics(metrics, [p for p, _ in pairs], [r for _, r in pairs])
    return metrics, ",".join(sorted(versions))
