"""The job runner's interfaces implemented over SGLang's tokenizer manager, in the HTTP process.

:class:`TokenizerManagerExecutor` sends chunks, restores and saves to the scheduler(s) as IPC control messages
(:mod:`sglang_mezo.scheduler.messages`) and waits for the reply; :class:`TokenizerManagerScorer` scores and
generates through SGLang's own request path, as user traffic.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import TypeVar

import torch

from sglang_mezo.core.interface import CompletionScores, ScoringItem
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.jobs.errors import InvalidRequest, Unavailable
from sglang_mezo.protocol import ChunkOutcome, RestoreOutcome, SaveOutcome, StepChunk
from sglang_mezo.scheduler.messages import MezoChunkReqInput, MezoRestoreReqInput, MezoSaveReqInput

_O = TypeVar("_O", ChunkOutcome, RestoreOutcome, SaveOutcome)
_Moved = TypeVar("_Moved", ChunkOutcome, RestoreOutcome)

COMMUNICATOR = "mezo"
"""``_COMMUNICATOR_SPECS`` entry: the tokenizer manager gets ``mezo_communicator``."""


class TokenizerManagerExecutor:
    """Implements :class:`sglang_mezo.protocol.ChunkExecutor`: one control message per call, one reply."""

    def __init__(self, tokenizer_manager) -> None:
        self.tm = tokenizer_manager

    async def run_chunk(self, chunk: StepChunk) -> ChunkOutcome:
        return self._relabelled(await self._send(MezoChunkReqInput(chunk=chunk), ChunkOutcome))

    async def drain(self, timeout_s: float) -> None:
        # the tokenizer manager holds one state per user request until it finishes (our own messages go through
        # a communicator and hold none); requests arriving from now on are not waited for, so none starves training
        in_flight = set(self.tm.rid_to_state)
        deadline = time.monotonic() + timeout_s
        while in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            in_flight &= self.tm.rid_to_state.keys()

    async def restore(self, history: Sequence[Trajectory], weight_version: str) -> RestoreOutcome:
        return self._relabelled(await self._send(
            MezoRestoreReqInput(history=tuple(history), weight_version=weight_version), RestoreOutcome))

    async def save(self, path: str, *, float32: bool = False) -> SaveOutcome:
        return await self._send(MezoSaveReqInput(path=path, float32=float32), SaveOutcome)

    async def _send(self, request, expected: type[_O]) -> _O:
        self.tm.auto_create_handle_loop()
        communicator = getattr(self.tm, f"{COMMUNICATOR}_communicator")
        replies = await communicator(request)
        if len(replies) != 1:
            # each data-parallel replica would draw its own losses; keeping replicas identical is not built yet
            raise Unavailable(f"expected one scheduler reply, got {len(replies)} (data parallel is not supported)")
        outcome = replies[0].outcome
        if not isinstance(outcome, expected):
            raise Unavailable(f"the scheduler answered a {type(request).__name__} with a {type(outcome).__name__}")
        return outcome

    def _relabelled(self, outcome: _Moved) -> _Moved:
        """Weights that moved have a new label: what /model_info and responses without spans report."""
        if outcome.weight_version:
            self.tm._update_weight_version_if_provided(outcome.weight_version)
        return outcome


class TokenizerManagerScorer:
    """Implements :class:`sglang_mezo.protocol.ServedScorer`: sequences go through SGLang's own request path, as
    user traffic: batched with it, through the prefix cache (which only ever holds KV of the served weights), at
    whichever committed step is served."""

    BATCH = 64
    """Sequences per request: bounds one request's KV and memory."""

    def __init__(self, tokenizer_manager) -> None:
        self.tm = tokenizer_manager

    async def score(self, items: Sequence[ScoringItem]) -> tuple[CompletionScores, set[str]]:
        from sglang.srt.managers.io_struct import GenerateReqInput

        sums: list[float] = []
        nexts: list[torch.Tensor] = []
        versions: set[str] = set()
        for start in range(0, len(items), self.BATCH):
            chunk = items[start : start + self.BATCH]
            asks = any(i.next_token_ids for i in chunk)
            request = GenerateReqInput(
                input_ids=[list(i.prompt_ids) + list(i.completion_ids) for i in chunk],
                sampling_params={"max_new_tokens": 0},
                return_logprob=True,
                # entries from the last prompt token on: the first is that token's own, the rest the completion's
                logprob_start_len=[len(i.prompt_ids) - 1 for i in chunk],
                # SGLang reads a list per request or broadcasts one list to all: items that ask nothing ask for their
                # own first token, which costs nothing
                token_ids_logprob=[list(i.next_token_ids or i.completion_ids[:1]) for i in chunk] if asks else None,
            )
            outputs = await self._first(request)
            for out, item in zip(outputs, chunk, strict=True):
                meta = out["meta_info"]
                sums.append(math.fsum(e[0] for e in meta["input_token_logprobs"][1:]))
                versions.add(str(meta["weight_version"]))
                # entry 1, like the completion's first log-prob: read where the first completion token is predicted
                asked = {int(e[1]): float(e[0]) for e in meta["input_token_ids_logprobs"][1]} if asks else {}
                nexts.append(torch.tensor([asked[t] for t in item.next_token_ids], dtype=torch.float64))
        scores = CompletionScores(sum_logprob=torch.tensor(sums, dtype=torch.float64),
                                  n_tokens=torch.tensor([len(i.completion_ids) for i in items], dtype=torch.int64),
                                  next_token_logprobs=tuple(nexts) if any(i.next_token_ids for i in items) else ())
        return scores, versions

    async def _first(self, request) -> list[dict]:
        """The outputs of a batch request; SGLang refusing an input (too long, …) is the request's problem."""
        try:
            return await self.tm.generate_request(request, None).__anext__()
        except ValueError as exc:
            raise InvalidRequest(f"SGLang refused an example: {exc}") from exc

    async def generate(self, items: Sequence[ScoringItem]) -> list[tuple[str, str]]:
        from sglang.srt.managers.io_struct import GenerateReqInput

        out: list[tuple[str, str]] = []
        for start in range(0, len(items), self.BATCH):
            chunk = items[start : start + self.BATCH]
            request = GenerateReqInput(
                input_ids=[list(i.prompt_ids) for i in chunk],
                # as long as the reference at most (or up to the end token): an answer, not an essay
                sampling_params=[{"max_new_tokens": len(i.completion_ids), "temperature": 0} for i in chunk],
            )
            outputs = await self._first(request)
            decode = self.tm.tokenizer.decode
            out += [(o["text"], decode(list(i.completion_ids), skip_special_tokens=True))
                    for o, i in zip(outputs, chunk, strict=True)]
        return out
