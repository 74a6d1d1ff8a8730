"""The reference engine: the MeZO core on a plain transformers causal LM (CPU or CUDA), no SGLang.

Used by tests and benchmarks, to replay a trajectory onto a Hugging Face checkpoint, and by users without SGLang.
Parameter names of ``*ForCausalLM`` models are the checkpoint's tensor names, and tied weights (embeddings shared
with the LM head) appear once in ``named_parameters()``: one tensor, perturbed and updated once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sglang_mezo.core.interface import CompletionScores, ScoringItem
from sglang_mezo.core.params import TrainablePiece


class HFEngine:
    """Implements :class:`sglang_mezo.core.interface.ScoringEngine` for a transformers causal LM."""

    def __init__(self, model: torch.nn.Module, *, max_batch_tokens: int = 16384, pad_token_id: int = 0) -> None:
        self.model = model.eval().requires_grad_(False)
        self.max_batch_tokens = max_batch_tokens
        self.pad_token_id = pad_token_id

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_pieces(self) -> list[TrainablePiece]:
        return [
            TrainablePiece(name=name, data=param.detach(), full_shape=tuple(param.shape))
            for name, param in self.model.named_parameters()
        ]

    @torch.inference_mode()
    def score(self, items: Sequence[ScoringItem]) -> CompletionScores:
        """Sum of completion-token log-probs per item (and the asked next-token log-probs), right-padded batches of
        at most ``max_batch_tokens``."""
        sums, nexts = [], []
        for batch in self._batches(items):
            batch_sums, batch_nexts = self._score_batch(batch)
            sums.append(batch_sums)
            nexts.extend(batch_nexts)
        return CompletionScores(
            sum_logprob=torch.cat(sums).cpu(),
            n_tokens=torch.tensor([len(item.completion_ids) for item in items], dtype=torch.int64),
            next_token_logprobs=tuple(nexts) if any(item.next_token_ids for item in items) else (),
        )

    def _batches(self, items: Sequence[ScoringItem]) -> list[list[ScoringItem]]:
        batches: list[list[ScoringItem]] = []
        current: list[ScoringItem] = []
        longest = 0
        for item in items:
            length = len(item.prompt_ids) + len(item.completion_ids)
            if current and max(longest, length) * (len(current) + 1) > self.max_batch_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(item)
            longest = max(longest, length)
        if current:
            batches.append(current)
        return batches

    def _score_batch(self, batch: list[ScoringItem]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seqs = [item.prompt_ids + item.completion_ids for item in batch]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        # log p(token t) comes from the logits at t - 1: only positions from the shortest prompt's last token to the
        # longest sequence's second-to-last are needed (the vocabulary projection and its log-softmax are a large
        # share of a small model's forward)
        lo, hi = min(len(item.prompt_ids) for item in batch) - 1, width - 1
        target_mask = torch.zeros((len(seqs), hi - lo), dtype=torch.bool)
        for i, (item, seq) in enumerate(zip(batch, seqs, strict=True)):
            target_mask[i, len(item.prompt_ids) - 1 - lo : len(seq) - 1 - lo] = True
        ids, mask, target_mask = ids.to(self.device), mask.to(self.device), target_mask.to(self.device)
        keep = torch.arange(lo, hi, device=self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
        all_logprobs = torch.log_softmax(logits, dim=-1)
        logprobs = all_logprobs.gather(-1, ids[:, lo + 1 : hi + 1, None]).squeeze(-1)
        sums = torch.where(target_mask, logprobs, 0.0).sum(dim=1, dtype=torch.float64)
        # the asked tokens, read where the completion's first token is predicted (the last prompt position)
        nexts = [all_logprobs[i, len(item.prompt_ids) - 1 - lo, list(item.next_token_ids)].double().cpu()
                 for i, item in enumerate(batch)]
        return sums, nexts
