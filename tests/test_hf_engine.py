"""The transformers reference engine: batched, padded scoring equals scoring each sequence alone; tied
embeddings are one trainable tensor."""

from __future__ import annotations

import torch
from tiny_models import tiny_llama

from sglang_mezo.core.interface import ScoringItem
from sglang_mezo.engines.hf import HFEngine


def test_batched_scores_equal_one_by_one():
    model = tiny_llama(0)
    engine = HFEngine(model, max_batch_tokens=20)  # forces several batches with padding
    items = [ScoringItem((5, 6, 7), (8, 9)), ScoringItem((10,), (11, 12, 13, 14)), ScoringItem((4, 4, 4, 4, 4), (5,))]
    scores = engine.score(items)
    assert scores.n_tokens.tolist() == [2, 4, 1]
    for i, item in enumerate(items):
        ids = torch.tensor([item.prompt_ids + item.completion_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        expected = sum(
            logprobs[len(item.prompt_ids) - 1 + j, tok].item() for j, tok in enumerate(item.completion_ids)
        )
        assert abs(scores.sum_logprob[i].item() - expected) < 1e-4


def test_tied_embeddings_are_one_tensor():
    engine = HFEngine(tiny_llama(0))
    names = [p.name for p in engine.trainable_pieces()]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == len(set(names))
    piece = next(p for p in engine.trainable_pieces() if p.name == "model.embed_tokens.weight")
    assert piece.data.data_ptr() == engine.model.lm_head.weight.data_ptr()


def test_one_token_options_share_their_prompt_and_score_as_one_sequence_each():
    """A choice whose options are one token each is one scored sequence: the options' log-probs are read at the
    last prompt position. Losses and accuracies equal scoring every option as its own sequence, to 1e-5; a choice
    with a longer option, in the same batch, keeps one sequence per option."""
    from sglang_mezo.core.objectives import ChoiceExample, Objective, evaluate, example_losses, scoring_items

    engine = HFEngine(tiny_llama(0), max_batch_tokens=24)  # several padded batches
    batch = [ChoiceExample((5, 6, 7), ((8,), (9,)), label=1), ChoiceExample((10, 11), ((12,), (13,), (14,)), label=0),
             ChoiceExample((4, 4, 4, 4), ((5, 6), (7,)), label=1), ChoiceExample((3,), ((9,), (8,)), label=0)]
    shared, separate = scoring_items(batch), scoring_items(batch, share_prompts=False)
    assert len(shared) == 1 + 1 + 2 + 1 and len(separate) == 2 + 3 + 2 + 2
    shared_scores, separate_scores = engine.score(shared), engine.score(separate)
    for objective in (Objective.CLASSIFICATION, Objective.ACCURACY):
        a = example_losses(objective, batch, shared_scores)
        b = example_losses(objective, batch, separate_scores, share_prompts=False)
        assert (a - b).abs().max().item() <= 1e-5, (objective, a, b)
    metrics = evaluate(Objective.CLASSIFICATION, batch, shared_scores)
    assert metrics.accuracy == evaluate(Objective.CLASSIFICATION, batch, separate_scores,
                                        share_prompts=False).accuracy
    assert 0.0 < metrics.loss < 10.0
