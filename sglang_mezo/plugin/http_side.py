"""The HTTP-process side of the plugin: the chunk executor over SGLang's IPC, and mounting the /mezo routes."""

from __future__ import annotations

import asyncio
import logging
import time

from sglang_mezo.core.config import MezoConfig
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
                            inconsistent=r.inconsistent, aborted=r.aborted, weight_version=r.weight_version, info=dict(r.info),
                            trainable_fingerprint=r.trainable_fingerprint,
                            trainable_names=list(r.trainable_names))


def mount_routes(app, server_args, tokenizer_manager, options: MezoServerOptions) -> None:
    """Add the /mezo routes to SGLang's FastAPI app (before uvicorn starts)."""
    from sglang_mezo.server.routes import build_router

    defaults = MezoConfig(lr=options.lr, eps=options.eps, n_probes=options.n_probes,
                          z_kind=options.resolved_z_kind(str(server_args.device)), selection=options.selection)
    runner = JobRunner(TokenizerManagerExecutor(tokenizer_manager), chunk_target_s=options.chunk_ms / 1e3,
                       yield_s=options.yield_ms / 1e3, base_weight_version=str(server_args.weight_version),
                       base_model=str(server_args.model_path))
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
