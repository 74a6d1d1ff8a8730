"""Scoring completions inside SGLang's scheduler, with its own batch machinery: the MeZO core's ScoringEngine.

A scoring batch is a prefill with input log-probs and no sampling (``max_new_tokens = 0``), built and run on the
scheduler thread between user batches. It never matches or enters the radix cache: no prefix match on the way in
(the cache may hold KV from other weights), ``skip_radix_cache_insert`` and ``release_kv_cache(checkpoint=False)``
on the way out, in ``finally``, so its KV slots and request rows are returned whatever happens.
"""

from __future__ import annotations

import itertools
import uuid
from array import array
from collections.abc import Sequence

import torch

from sglang_mezo.core.interface import CompletionScores, ScoringItem
from sglang_mezo.core.params import TrainablePiece

from .weights import served_pieces


class KVBudgetError(ValueError):
    """The scoring batch does not fit in the KV pool."""


class SchedulerEngine:
    """Implements :class:`sglang_mezo.core.interface.ScoringEngine` on a live SGLang ``Scheduler``."""

    def __init__(self, scheduler) -> None:
        from sglang.srt.runtime_context import get_parallel

        self.scheduler = scheduler
        self.model = scheduler.tp_worker.model_runner.model
        parallel = get_parallel()
        self.tp_rank, self.tp_size = parallel.tp_rank, parallel.tp_size
        self._pieces = served_pieces(self.model, self.tp_rank, self.tp_size,
                                     hf_config=scheduler.model_config.hf_config)
        self._ids = itertools.count()

    @property
    def num_layers(self) -> int:
        return int(self.scheduler.model_config.hf_config.num_hidden_layers)

    @property
    def context_len(self) -> int:
        return int(self.scheduler.model_config.context_len)

    def trainable_pieces(self) -> list[TrainablePiece]:
        return self._pieces

    def score(self, items: Sequence[ScoringItem], lora_ids: Sequence[str | None] | None = None) -> CompletionScores:
        """Score ``items`` under the served weights, or each under its own LoRA adapter (``lora_ids``: SGLang's id
        per item, None for the base), in as few forward batches as the prefill budget allows."""
        tagged = list(zip(items, lora_ids if lora_ids is not None else [None] * len(items), strict=True))
        sums: list[torch.Tensor] = []
        nexts: list[torch.Tensor] = []
        for chunk in self._chunks(tagged):
            chunk_sums, chunk_nexts = self._score_chunk(chunk)
            sums.append(chunk_sums)
            nexts.extend(chunk_nexts)
        return CompletionScores(
            sum_logprob=torch.cat(sums).double().cpu(),
            n_tokens=torch.tensor([len(i.completion_ids) for i in items], dtype=torch.int64),
            next_token_logprobs=tuple(nexts) if any(i.next_token_ids for i in items) else (),
        )

    def score_copies(self, items: Sequence[ScoringItem], lora_ids: Sequence[str]) -> list[CompletionScores]:
        """``items`` under each of the adapters ``lora_ids``, all in the same forward batches (the adapters must be
        resident in SGLang's LoRA pool, or loadable into it, together): one :class:`CompletionScores` per adapter."""
        flat = self.score([i for _ in lora_ids for i in items], [u for u in lora_ids for _ in items])
        n = len(items)
        return [CompletionScores(
            sum_logprob=flat.sum_logprob[k * n : (k + 1) * n], n_tokens=flat.n_tokens[k * n : (k + 1) * n],
            next_token_logprobs=flat.next_token_logprobs[k * n : (k + 1) * n] if flat.next_token_logprobs else ())
            for k in range(len(lora_ids))]

    def _chunks(self, items: Sequence[tuple[ScoringItem, str | None]]) -> list[list[tuple[ScoringItem, str | None]]]:
        """Split into forward passes of at most the scheduler's prefill budget (a hand-built batch bypasses the
        scheduler's own chunking) and check the KV pool can hold each."""
        s = self.scheduler
        budget = min(s.max_prefill_tokens, s.max_total_num_tokens)
        max_reqs = max(1, min(s.max_running_requests, s.req_to_token_pool.available_size()))
        chunks, current, tokens = [], [], 0
        for tagged in items:
            item = tagged[0]
            n = len(item.prompt_ids) + len(item.completion_ids)
            if n > self.context_len:
                raise ValueError(f"a scored sequence has {n} tokens, more than the context length {self.context_len}")
            if current and (tokens + n > budget or len(current) >= max_reqs):
                chunks.append(current)
                current, tokens = [], 0
            current.append(tagged)
            tokens += n
        if current:
            chunks.append(current)
        free = s.token_to_kv_pool_allocator.available_size() + s.tree_cache.evictable_size()
        largest = max(sum(len(i.prompt_ids) + len(i.completion_ids) for i, _ in c) for c in chunks)
        if largest > free:
            raise KVBudgetError(f"a scoring pass needs {largest} KV slots but only {free} are free; "
                                "use fewer or shorter examples per step, or a larger --max-total-tokens")
        return chunks

    def _score_chunk(self, tagged: list[tuple[ScoringItem, str | None]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        from sglang.srt.managers.overlap_utils import resolve_forward_inputs
        from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
        from sglang.srt.mem_cache.common import release_kv_cache
        from sglang.srt.sampling.sampling_params import SamplingParams

        s = self.scheduler
        tag = uuid.uuid4().hex[:8]
        reqs = []
        items = [item for item, _ in tagged]
        for item, lora_id in tagged:
            params = SamplingParams(max_new_tokens=0)
            params.normalize(None)
            req = Req(f"mezo-{tag}-{next(self._ids)}", "", array("q", item.prompt_ids + item.completion_ids), params,
                      return_logprob=True, eos_token_ids=s.model_config.hf_eos_token_id,
                      vocab_size=s.model_config.vocab_size,
                      # SGLang's own way to read chosen tokens' log-probs at every scored position (its /v1/score)
                      token_ids_logprob=list(item.next_token_ids) or None, lora_id=lora_id)
            # log p(token k) comes from position k - 1: start one before the completion
            req.logprob_start_len = len(item.prompt_ids) - 1
            req.skip_radix_cache_insert = True
            req.init_next_round_input(None)  # None: no prefix match against KV of other weights
            req.extend_end = len(req.full_untruncated_fill_ids)
            reqs.append(req)
        batch = ScheduleBatch.init_new(reqs, s.req_to_token_pool, s.token_to_kv_pool_allocator, s.tree_cache,
                                       s.model_config, s.enable_overlap, s.spec_algorithm)
        try:
            batch.prepare_for_extend()
            resolve_forward_inputs(batch, s.future_map)
            result = s.tp_worker.forward_batch_generation(batch)
            logprobs = result.logits_output.input_token_logprobs.float().cpu()  # host sync
            asked = result.logits_output.input_token_ids_logprobs_val
        finally:
            for req in reqs:
                if req.kv.holds_kv:
                    release_kv_cache(req, s.tree_cache, checkpoint=False)
        # per request: len(completion) + 1 entries, the last one a dummy
        sums, start = [], 0
        for item in items:
            n = len(item.completion_ids)
            sums.append(logprobs[start : start + n].double().sum())
            start += n + 1
        if start != logprobs.numel():
            raise RuntimeError(f"unexpected input log-prob layout: {logprobs.numel()} entries for {start} expected")
        nexts = [_first_position(asked[i], len(item.next_token_ids)) if item.next_token_ids else torch.empty(0)
                 for i, item in enumerate(items)]
        return torch.stack(sums), nexts


def _first_position(rows, k: int) -> torch.Tensor:
    """The asked tokens' log-probs at a request's first scored position (the last prompt token's), from SGLang's
    ``input_token_ids_logprobs_val`` entry for it: a list of per-position rows, or (when SGLang copies them to pinned
    memory asynchronously) a list of ``[positions, k]`` tensors."""
    if rows and isinstance(rows[0], torch.Tensor):
        first = torch.cat([r.reshape(-1, k) for r in rows])[0]
    else:
        first = torch.tensor(rows[0] if rows else [], dtype=torch.float64)
    if first.numel() != k:
        raise RuntimeError(f"unexpected token-id log-prob layout: {first.numel()} values for {k} asked tokens")
    return first.double().cpu()
