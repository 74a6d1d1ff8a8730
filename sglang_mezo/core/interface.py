"""What the core needs from an inference engine: named trainable tensors and batched completion scoring.

Engines implement this for transformers (``sglang_mezo.engines.hf``) and for SGLang's scheduler (the plugin);
the core imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .params import TrainablePiece


@dataclass(frozen=True)
class ScoringItem:
    """A token sequence to score: the log-probability of ``completion_ids`` given ``prompt_ids``; and, when
    ``next_token_ids`` is given, log p(t | prompt) of each of those tokens, read at the same position as the
    completion's first token. That second read is what lets the k one-token options of a choice share one sequence
    (one forward of the prompt instead of k)."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    next_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt_ids or not self.completion_ids:
            raise ValueError("a scoring item needs a non-empty prompt and a non-empty completion")


@dataclass(frozen=True)
class CompletionScores:
    """Per item: the summed log-probability of the completion tokens (fp32 or wider) and their count; and for items
    with ``next_token_ids``, the log-probabilities of those tokens after the prompt (float64, in the order asked; an
    empty tensor for items that asked none). ``next_token_logprobs`` is empty when no item asked."""

    sum_logprob: torch.Tensor
    n_tokens: torch.Tensor
    next_token_logprobs: tuple[torch.Tensor, ...] = ()


class ScoringEngine(Protocol):
    """The engine-side contract of the MeZO core."""

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks (for "train the last k layers")."""
        ...

    def trainable_pieces(self) -> list[TrainablePiece]:
        """Every weight the engine could train, as pieces of checkpoint tensors (see :class:`TrainablePiece`)."""
        ...

    def score(self, items: Sequence[ScoringItem]) -> CompletionScores:
        """Score all items under the current weights, as one batch or a few (no caching across calls)."""
        ...
