"""Evaluation metrics of generated text: SQuAD's answer normalisation, exact match and token F1."""

from __future__ import annotations

import pytest

from sglang_mezo.core.objectives import EvalMetrics, exact_match, generation_metrics, normalize_answer, token_f1


def test_answers_are_normalised_like_squad():
    assert normalize_answer("The  Eiffel-Tower!") == ["eiffel", "tower"]
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0


@pytest.mark.parametrize("prediction, reference, f1", [
    ("a cat sat", "the cat sat on the mat", 2 * (1.0 * 0.5) / 1.5),  # 2 words in common of 2 and 4
    ("mat mat", "mat", 2 * (0.5 * 1.0) / 1.5),  # repeated words count once per occurrence in both
    ("dog", "cat", 0.0),
    ("", "", 1.0),
    ("the", "cat", 0.0),  # only an article: nothing left
])
def test_token_f1(prediction, reference, f1):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_generation_metrics_average_over_examples():
    metrics = generation_metrics(EvalMetrics(n=2, loss=1.5), ["Paris", "in 1999"], ["paris", "1999"])
    assert metrics.exact_match == 0.5 and metrics.f1 == pytest.approx((1.0 + 2 * 0.5 / 1.5) / 2)
    assert metrics.loss == 1.5
