"""The HTTP-process side of the plugin: the chunk executor over SGLang's IPC, and mounting the /mezo routes."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

import torch

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.interface import CompletionScores, ScoringItem
from sglang_mezo.jobs.executor import ChunkOutcome, StepChunk
from sglang_mezo.jobs.runner import JobRunner

from .messages import MezoChunkReqInput, MezoRestoreReqInput, MezoSaveReqInput
from .options import MezoServerOptions

logger = logging.getLogger(__name__)

COMMUNICATOR = "mezo"
"""``_COMMUNICATOR_SPECS`` entry: the tokenizer manager gets ``mezo_communicator``."""


class TokenizerManagerExecutor:
    """Sends chunks and restores to the scheduler(s) through the tokenizer manager and waits for the reply."""

    def __init__(self, tokenizer_manager) -> None:
        self.tm = tokenizer_manager

    async def run_chunk(self, chunk: StepChunk) -> ChunkOutcome:
        return await self._send(MezoChunkReqInput(job_id=chunk.job_id, config=chunk.config,
                                                  objective=chunk.objective, steps=chunk.steps, batches=chunk.batches))

    async def drain(self, timeout_s: float) -> None:
        # the tokenizer manager holds one state per user request until it finishes (our own messages go through
        # a communicator and hold none); requests arriving from now on are not waited for, so none starves training
        in_flight = set(self.tm.rid_to_state)
        deadline = time.monotonic() + timeout_s
        while in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            in_flight &= self.tm.rid_to_state.keys()

    async def restore(self, history: list[dict], weight_version: str) -> ChunkOutcome:
        return await self._send(MezoRestoreReqInput(history=history, weight_version=weight_version))

    async def save(self, path: str) -> ChunkOutcome:
        return await self._send(MezoSaveReqInput(path=path))

    async def _send(self, request) -> ChunkOutcome:
        self.tm.auto_create_handle_loop()
        communicator = getattr(self.tm, f"{COMMUNICATOR}_communicator")
        replies = await communicator(request)
        if len(replies) != 1:
            # each data-parallel replica would draw its own losses; keeping replicas identical is not built yet
            raise RuntimeError(f"expected one scheduler reply, got {len(replies)} (data parallel is not supported)")
        r = replies[0]
        if r.weight_version is not None:  # what /get_weight_version and responses without spans report
            self.tm._update_weight_version_if_provided(r.weight_version)
        return ChunkOutcome(success=r.success, message=r.message, results=list(r.results),
                            inconsistent=r.inconsistent, aborted=r.aborted, info=dict(r.info),
                            trainable_fingerprint=r.trainable_fingerprint,
                            trainable_names=list(r.trainable_names))


class TokenizerManagerScorer:
    """Scores sequences through SGLang's own request path, as user traffic: batched with it, through the prefix
    cache (which only ever holds KV of the served weights), at whichever committed step is served."""

    BATCH = 64
    """Sequences per request: bounds one request's KV and memory."""


    def __init__(self, tokenizer_manager) -> None:
        self.tm = tokenizer_manager

    async def score(self, items: Sequence[ScoringItem]) -> tuple[CompletionScores, set[str]]:
        from sglang.srt.managers.io_struct import GenerateReqInput

        sums: list[float] = []
        versions: set[str] = set()
        for start in range(0, len(items), self.BATCH):
            chunk = items[start : start + self.BATCH]
            request = GenerateReqInput(
                input_ids=[list(i.prompt_ids) + list(i.completion_ids) for i in chunk],
                sampling_params={"max_new_tokens": 0},
                return_logprob=True,
                # entries from the last prompt token on: the first is that token's own, the rest the completion's
                logprob_start_len=[len(i.prompt_ids) - 1 for i in chunk],
            )
            outputs = await self.tm.generate_request(request, None).__anext__()
            for out in outputs:
                sums.append(math.fsum(e[0] for e in out["meta_info"]["input_token_logprobs"][1:]))
                versions.add(str(out["meta_info"]["weight_version"]))
        scores = CompletionScores(sum_logprob=torch.tensor(sums, dtype=torch.float64),
                                  n_tokens=torch.tensor([len(i.completion_ids) for i in items], dtype=torch.int64))
        return scores, versions


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
            outputs = await self.tm.generate_request(request, None).__anext__()
            decode = self.tm.tokenizer.decode
            out += [(o["text"], decode(list(i.completion_ids), skip_special_tokens=True))
                    for o, i in zip(outputs, chunk, strict=True)]
        return out


def _observers(server_args) -> list:
    if not getattr(server_args, "enable_metrics", False):
        return []
    from .metrics import PrometheusObserver

    return [PrometheusObserver({"model_name": str(server_args.served_model_name)})]


def mount_routes(app, server_args, tokenizer_manager, options: MezoServerOptions) -> None:
    """Add the /mezo routes to SGLang's FastAPI app (before uvicorn starts)."""
    from sglang_mezo.server.routes import build_router

    defaults = MezoConfig(lr=options.lr, eps=options.eps, n_probes=options.n_probes,
                          z_kind=options.resolved_z_kind(str(server_args.device)), selection=options.selection)
    runner = JobRunner(TokenizerManagerExecutor(tokenizer_manager), chunk_target_s=options.chunk_ms / 1e3,
                       yield_s=options.yield_ms / 1e3, base_weight_version=str(server_args.weight_version),
                       base_model=str(server_args.model_path), scorer=TokenizerManagerScorer(tokenizer_manager),
                       observers=_observers(server_args))
    app.include_router(build_router(
        runner,
        tokenizer=tokenizer_manager.tokenizer,
        defaults=defaults,
        max_steps=options.max_steps_per_job,
        context_len=int(tokenizer_manager.context_len),
        base_model=str(server_args.model_path),
    ))
    app.state.mezo_runner = runner
    logger.info("MeZO routes mounted under /mezo")
