"""Objectives: from the log-probabilities an engine scores to one loss per example.

* ``cross_entropy``: mean negative log-likelihood of the completion tokens (LM fine-tuning).
* ``classification``: cross-entropy over the options' length-normalised log-likelihoods (MeZO's prompt-based
  classification: "<text> It was" -> " great" / " terrible"). One-token options share one scored sequence.
* ``accuracy``: 1 - [argmax option == label]. Piecewise constant: most probes give L+ = L- (g = 0), which the
  step counts rather than hides.
* ``dpo`` (Rafailov et al., 2023): -log σ(β·[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]) over
  preference pairs, the log-probabilities summed over each answer's tokens. π_ref is the model the job starts from:
  its log-probabilities are measured once, before the first step (:func:`with_references`), and travel with the
  examples, so a step scores two sequences per pair and never a second model. Its accuracy is the share of pairs
  whose implicit reward margin is positive.

Evaluation also has exact match and token F1 of generated text (:func:`generation_metrics`, SQuAD's definitions),
computed from greedy generations of the serving engine.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .interface import CompletionScores, ScoringEngine, ScoringItem
from .spsa import LossFn


class Objective(str, enum.Enum):
    CROSS_ENTROPY = "cross_entropy"
    CLASSIFICATION = "classification"
    ACCURACY = "accuracy"
    DPO = "dpo"


@dataclass(frozen=True)
class CompletionExample:
    """Learn ``completion_ids`` after ``prompt_ids``."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]

    @property
    def tokens(self) -> int:
        """The tokens the example holds (what a server's per-job token limit counts)."""
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True)
class ChoiceExample:
    """Pick option ``label`` among ``option_ids`` after ``prompt_ids``."""

    prompt_ids: tuple[int, ...]
    option_ids: tuple[tuple[int, ...], ...]
    label: int

    def __post_init__(self) -> None:
        if len(self.option_ids) < 2:
            raise ValueError("a choice example needs at least two options")
        if not 0 <= self.label < len(self.option_ids):
            raise ValueError(f"label {self.label} is not an option index (0..{len(self.option_ids) - 1})")

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + sum(map(len, self.option_ids))


@dataclass(frozen=True)
class PreferenceExample:
    """Prefer ``chosen_ids`` to ``rejected_ids`` after ``prompt_ids`` (DPO, strength ``beta``). ``reference`` holds
    log π_ref of (chosen, rejected), summed over their tokens; None until measured (:func:`with_references`)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    beta: float = 0.1
    reference: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


Example = CompletionExample | ChoiceExample | PreferenceExample


def shares_prompt(example: Example) -> bool:
    """Whether a choice is scored as one sequence: its options are one token each, so their log-probabilities are
    all read at the position after the prompt (the usual verbalizers, " great"/" terrible"). Options of several
    tokens are scored one sequence each (the prompt computed once per option: sharing its KV inside a step is not
    built)."""
    return isinstance(example, ChoiceExample) and all(len(option) == 1 for option in example.option_ids)


def scoring_items(batch: Sequence[Example], *, share_prompts: bool = True) -> list[ScoringItem]:
    """The sequences to score for a batch, flattened: one per completion; one per choice whose options share its
    prompt (:func:`shares_prompt`, unless ``share_prompts`` is off), else one per option."""
    items: list[ScoringItem] = []
    for example in batch:
        if isinstance(example, CompletionExample):
            items.append(ScoringItem(example.prompt_ids, example.completion_ids))
        elif isinstance(example, PreferenceExample):
            items.extend(ScoringItem(example.prompt_ids, answer)
                         for answer in (example.chosen_ids, example.rejected_ids))
        elif share_prompts and shares_prompt(example):
            # the first option stands in as the completion: the options are read one position before it
            items.append(ScoringItem(example.prompt_ids, example.option_ids[0],
                                     next_token_ids=tuple(option[0] for option in example.option_ids)))
        else:
            items.extend(ScoringItem(example.prompt_ids, option) for option in example.option_ids)
    return items


def option_logits(batch: Sequence[ChoiceExample], scores: CompletionScores, *,
                  share_prompts: bool = True) -> list[torch.Tensor]:
    """Per example, the length-normalised log-likelihood of each option (the logits of the classifier), from the
    scores of ``scoring_items(batch, share_prompts=...)``."""
    per_token = scores.sum_logprob.double() / scores.n_tokens.double()
    out, start = [], 0
    for example in batch:
        if share_prompts and shares_prompt(example):
            out.append(scores.next_token_logprobs[start].double())
            start += 1
        else:
            n = len(example.option_ids)
            out.append(per_token[start : start + n])
            start += n
    return out


def with_references(batch: Sequence[PreferenceExample], scores: CompletionScores) -> tuple[PreferenceExample, ...]:
    """``batch`` with each pair's reference log-probabilities set, from the scores of ``scoring_items(batch)`` under
    the reference weights."""
    logprobs = scores.sum_logprob.double().tolist()
    return tuple(dataclasses.replace(e, reference=(logprobs[2 * i], logprobs[2 * i + 1])) for i, e in enumerate(batch))


def dpo_margins(batch: Sequence[PreferenceExample], scores: CompletionScores) -> torch.Tensor:
    """β·[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))] per pair (float64): DPO's implicit reward
    margin, from the scores of ``scoring_items(batch)``."""
    if not all(isinstance(e, PreferenceExample) for e in batch):
        raise ValueError("the dpo objective needs preference examples")
    if any(e.reference is None for e in batch):
        raise ValueError("the dpo objective needs the reference log-probabilities of every pair (with_references)")
    logprobs = scores.sum_logprob.double().view(-1, 2)
    reference = torch.tensor([e.reference for e in batch], dtype=torch.float64)
    beta = torch.tensor([e.beta for e in batch], dtype=torch.float64)
    return beta * ((logprobs - reference) @ torch.tensor([1.0, -1.0], dtype=torch.float64))


def example_losses(objective: Objective, batch: Sequence[Example], scores: CompletionScores, *,
                   share_prompts: bool = True) -> torch.Tensor:
    """One loss per example (float64), from the scores of ``scoring_items(batch, share_prompts=...)``."""
    if objective is Objective.DPO:
        return torch.nn.functional.softplus(-dpo_margins(batch, scores))  # -log σ(m), without overflow
    if objective is Objective.CROSS_ENTROPY:
        if not all(isinstance(e, CompletionExample) for e in batch):
            raise ValueError("the cross_entropy objective needs prompt/completion examples")
        return -scores.sum_logprob.double() / scores.n_tokens.double()
    if not all(isinstance(e, ChoiceExample) for e in batch):
        raise ValueError(f"the {objective.value} objective needs prompt/options/label examples")
    losses = []
    for example, logits in zip(batch, option_logits(batch, scores, share_prompts=share_prompts), strict=True):
        if objective is Objective.CLASSIFICATION:
            losses.append(-torch.log_softmax(logits, dim=0)[example.label])
        else:
            losses.append((logits.argmax() != example.label).double())
    return torch.stack(losses)


def batch_loss_fn(engine: ScoringEngine, objective: Objective, batch: Sequence[Example], *,
                  share_prompts: bool = True) -> LossFn:
    """The closure a MeZO step calls twice per probe: score ``batch`` now and return its mean loss."""
    items = scoring_items(batch, share_prompts=share_prompts)

    def loss() -> float:
        scores = engine.score(items)
        return float(example_losses(objective, batch, scores, share_prompts=share_prompts).mean())

    return loss


CopiesScorer = Callable[[Sequence[ScoringItem], Sequence[int]], Sequence[CompletionScores]]
"""Scores items under each of the given copies of the weights (see :mod:`.probes`), all in one go."""


def copies_loss_fn(score_copies: CopiesScorer, objective: Objective, batch: Sequence[Example], *,
                   share_prompts: bool = True) -> Callable[[Sequence[int]], list[float]]:
    """The scorer a step with its probes in copies calls once: ``batch``'s mean loss under each copy asked for."""
    items = scoring_items(batch, share_prompts=share_prompts)

    def losses(copies: Sequence[int]) -> list[float]:
        return [float(example_losses(objective, batch, scores, share_prompts=share_prompts).mean())
                for scores in score_copies(items, list(copies))]

    return losses


@dataclass(frozen=True)
class EvalMetrics:
    """An evaluation of a set of examples: the objective's mean loss; for choice examples the accuracy (the share
    whose highest length-normalised option log-likelihood is the label); for completion examples evaluated with
    generation, the exact match and token F1 of the greedy generations against the completions."""

    n: int
    loss: float
    accuracy: float | None = None
    exact_match: float | None = None
    f1: float | None = None

    def to_dict(self) -> dict:
        return {"n": self.n, "loss": self.loss, "accuracy": self.accuracy, "exact_match": self.exact_match,
                "f1": self.f1}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, words split on white space."""
    return _ARTICLES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """The F1 of the normalised words in common (SQuAD's metric)."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(metrics: EvalMetrics, predictions: Sequence[str], references: Sequence[str]) -> EvalMetrics:
    """``metrics`` with the exact match and token F1 of ``predictions`` against ``references`` added."""
    n = len(references)
    return dataclasses.replace(metrics, exact_match=sum(map(exact_match, predictions, references)) / n,
                               f1=sum(map(token_f1, predictions, references)) / n)


def evaluate(objective: Objective, examples: Sequence[Example], scores: CompletionScores, *,
             share_prompts: bool = True) -> EvalMetrics:
    """Metrics of ``examples`` from the scores of ``scoring_items(examples, share_prompts=...)``."""
    loss = float(example_losses(objective, examples, scores, share_prompts=share_prompts).mean())
    accuracy = None
    if objective is Objective.DPO:
        accuracy = float((dpo_margins(examples, scores) > 0).double().mean())
    elif examples and all(isinstance(e, ChoiceExample) for e in examples):
        logits = option_logits(examples, scores, share_prompts=share_prompts)
        hits = [int(option.argmax()) == e.label for e, option in zip(examples, logits, strict=True)]
        accuracy = sum(hits) / len(hits)
    return EvalMetrics(n=len(examples), loss=loss, accuracy=accuracy)
