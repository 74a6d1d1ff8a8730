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


def test_choice_losses_and_accuracy_by_hand():
    """Two examples, two options each, with summed log-probs and token counts chosen so the length-normalised
    scores are simple: example 0 prefers option 1 (its label), example 1 prefers option 0 (label 1)."""
    import math

    import torch

    from sglang_mezo.core.interface import CompletionScores
    from sglang_mezo.core.objectives import ChoiceExample, Objective, evaluate, example_losses

    batch = [ChoiceExample((1,), ((2,), (3, 4)), label=1), ChoiceExample((1,), ((5,), (6,)), label=1)]
    # per-token scores: ex0: -2/1 = -2, -2/2 = -1; ex1: -1, -3
    scores = CompletionScores(sum_logprob=torch.tensor([-2.0, -2.0, -1.0, -3.0], dtype=torch.float64),
                              n_tokens=torch.tensor([1, 2, 1, 1]))
    ce = example_losses(Objective.CLASSIFICATION, batch, scores, share_prompts=False)
    assert ce[0].item() == pytest.approx(math.log(1 + math.exp(-1)))  # -log softmax([-2, -1])[1]
    assert ce[1].item() == pytest.approx(math.log(1 + math.exp(2)))  # -log softmax([-1, -3])[1]
    assert example_losses(Objective.ACCURACY, batch, scores, share_prompts=False).tolist() == [0.0, 1.0]
    metrics = evaluate(Objective.CLASSIFICATION, batch, scores, share_prompts=False)
    assert metrics.accuracy == 0.5 and metrics.loss == pytest.approx(ce.mean().item())

    # shared: example 1's one-token options are one item whose asked log-probs are the option scores; example 0 (a
    # two-token option) keeps one item per option
    shared = CompletionScores(sum_logprob=torch.tensor([-2.0, -2.0, -1.0], dtype=torch.float64),
                              n_tokens=torch.tensor([1, 2, 1]),
                              next_token_logprobs=(torch.empty(0), torch.empty(0),
                                                   torch.tensor([-1.0, -3.0], dtype=torch.float64)))
    assert torch.equal(example_losses(Objective.CLASSIFICATION, batch, shared), ce)


def test_dpo_loss_margin_and_accuracy_by_hand():
    """Two pairs with summed log-probs chosen by hand: pair 0 moved towards its chosen answer since the reference
    (margin β·[(−2 − −3) − (−5 − −4)] = 0.1·2 = 0.2), pair 1 away from it (margin 0.5·[(−4 − −3) − (−1 − −2)] = −1)."""
    import math

    import torch

    from sglang_mezo.core.interface import CompletionScores
    from sglang_mezo.core.objectives import (Objective, PreferenceExample, dpo_margins, evaluate, example_losses,
                                             scoring_items, with_references)

    pairs = [PreferenceExample((1, 2), (3,), (4, 5)), PreferenceExample((1,), (6, 7), (8,), beta=0.5)]
    items = scoring_items(pairs)
    assert [(i.prompt_ids, i.completion_ids) for i in items] == [((1, 2), (3,)), ((1, 2), (4, 5)), ((1,), (6, 7)),
                                                                  ((1,), (8,))]
    reference = CompletionScores(torch.tensor([-3.0, -4.0, -3.0, -2.0]), torch.tensor([1, 2, 2, 1]))
    pairs = with_references(pairs, reference)
    assert [p.reference for p in pairs] == [(-3.0, -4.0), (-3.0, -2.0)]
    now = CompletionScores(torch.tensor([-2.0, -5.0, -4.0, -1.0]), torch.tensor([1, 2, 2, 1]))
    assert dpo_margins(pairs, now).tolist() == pytest.approx([0.2, -1.0])
    losses = example_losses(Objective.DPO, pairs, now)
    assert losses.tolist() == pytest.approx([-math.log(1 / (1 + math.exp(-0.2))), -math.log(1 / (1 + math.exp(1.0)))])
    assert evaluate(Objective.DPO, pairs, now).accuracy == 0.5
    # at the reference itself every margin is 0: the loss is log 2, whatever β
    assert example_losses(Objective.DPO, pairs, reference).tolist() == pytest.approx([math.log(2)] * 2)


def test_dpo_refuses_pairs_without_references_and_other_examples():
    import torch

    from sglang_mezo.core.interface import CompletionScores
    from sglang_mezo.core.objectives import CompletionExample, Objective, PreferenceExample, example_losses

    scores = CompletionScores(torch.tensor([-1.0, -2.0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="reference"):
        example_losses(Objective.DPO, [PreferenceExample((1,), (2,), (3,))], scores)
    with pytest.raises(ValueError, match="preference examples"):
        example_losses(Objective.DPO, [CompletionExample((1,), (2,))], scores)
    with pytest.raises(ValueError, match="beta"):
        PreferenceExample((1,), (2,), (3,), beta=0.0)
