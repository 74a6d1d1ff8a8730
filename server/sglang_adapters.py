"""The job runner's interfaces implemented over SGLang's tokenizer manager, in the HTTP process.

:class:`TokenizerManagerExecutor` sends chunks, restores and saves to the scheduler(s) as IPC control messages
(:mod:`sglang_mezo.scheduler.messages`) and waits for the replies, one per data-parallel replica, which must
agree; :class:`TokenizerManagerScorer` scores and generates through SGLang's own request path, as user traffic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import TypeVar

import torch

from sglang_mezo.core.interface import CompletionScores, ScoringItem
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.jobs.errors import InvalidRequest, Unavailable
from sglang_mezo.protocol import (
    AdapterRetired,
    AdapterVersion,
    ChunkOutcome,
    Failure,
    FailureKind,
    FleetJoined,
    ReplicaFingerprint,
    RestoreOutcome,
    SaveOutcome,
    StepChunk,
)
from sglang_mezo.scheduler.messages import (
    MezoAdapterRetireReqInput,
    MezoChunkReqInput,
    MezoFingerprintReqInput,
    MezoReqOutput,
    MezoRestoreReqInput,
    MezoSaveReqInput,
)

logger = logging.getLogger(__name__)

_O = TypeVar("_O", ChunkOutcome, RestoreOutcome, SaveOutcome, AdapterRetired, ReplicaFingerprint, FleetJoined)
_Moved = TypeVar("_Moved", ChunkOutcome, RestoreOutcome)

COMMUNICATOR = "mezo"
"""``_COMMUNICATOR_SPECS`` entry: the tokenizer manager gets ``mezo_communicator``."""


class TokenizerManagerExecutor:
    """Implements :class:`sglang_mezo.protocol.ChunkExecutor`: one control message per call, one reply per
    replica."""

    def __init__(self, tokenizer_manager) -> None:
        self.tm = tokenizer_manager
        self.adapters: dict[str, AdapterVersion] = {}
        """The version each trained adapter's name serves now (shared with the scorers)."""
        self._retiring: set[asyncio.Task] = set()

    async def run_chunk(self, chunk: StepChunk) -> ChunkOutcome:
        outcome = await self._send(MezoChunkReqInput(chunk=chunk), ChunkOutcome)
        if outcome.adapter_version is not None:
            await self._serve(outcome.adapter_version)
        return self.relabelled(outcome)

    async def _serve(self, version: AdapterVersion) -> None:
        """Point the adapter's name at ``version`` in SGLang's LoRA registry, in one step under its locks (a request
        resolves the name either before, to the old id, or after, to the new one), and unload the old version once
        the requests that resolved to it have finished."""
        from sglang.srt.lora.lora_registry import LoRARef

        registry = self.tm.lora_registry
        ref = LoRARef(lora_id=version.lora_id, lora_name=version.name, lora_path=f"mezo://{version.name}",
                      pinned=False)
        async with self.tm.lora_update_lock, registry._registry_lock.writer_lock:
            old = registry._registry.pop(version.name, None)
            registry._register_adapter(ref)
        self.adapters[version.name] = version
        if old is not None:
            task = asyncio.get_running_loop().create_task(self._retire(old.lora_id))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def loaded_folder(self, name: str) -> str | None:
        """The folder SGLang loaded adapter ``name`` from (``--lora-paths``, ``/load_lora_adapter``); None for a name
        it does not serve from a folder (ours are served from ``mezo://`` references)."""
        registry = getattr(self.tm, "lora_registry", None)
        ref = None if registry is None else registry.get_all_adapters().get(name)
        if ref is None or not ref.lora_path or ref.lora_path.startswith("mezo://"):
            return None
        return str(ref.lora_path)

    def adopt(self, version: AdapterVersion) -> None:
        """At launch, before serving: the name of an adapter the schedulers rebuilt from the journal serves
        ``version`` (the registry is not shared with any request yet, so no lock is taken)."""
        from sglang.srt.lora.lora_registry import LoRARef

        self.tm.lora_registry._register_adapter(LoRARef(lora_id=version.lora_id, lora_name=version.name,
                                                        lora_path=f"mezo://{version.name}", pinned=False))
        self.adapters[version.name] = version

    async def _retire(self, lora_id: str) -> None:
        try:
            await self.tm.lora_registry.wait_for_unload(lora_id)
            await self._send(MezoAdapterRetireReqInput(lora_ids=(lora_id,)), AdapterRetired)
        except Exception:  # noqa: BLE001 - a version left loaded costs host memory, never correctness
            logger.exception("MeZO: retiring adapter version %s failed", lora_id)

    async def end_adapter_job(self, job_id: str) -> None:
        try:
            await self._send(MezoAdapterRetireReqInput(job_id=job_id), AdapterRetired)
        except Exception:  # noqa: BLE001 - the job is over either way
            logger.exception("MeZO: dropping adapter job %s's training state failed", job_id)

    async def drain(self, timeout_s: float) -> None:
        # the tokenizer manager holds one state per user request until it finishes (our own messages go through
        # a communicator and hold none); requests arriving from now on are not waited for, so none starves training
        in_flight = set(self.tm.rid_to_state)
        deadline = time.monotonic() + timeout_s
        while in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            in_flight &= self.tm.rid_to_state.keys()

    async def restore(self, history: Sequence[Trajectory], weight_version: str) -> RestoreOutcome:
        return self.relabelled(await self._send(
            MezoRestoreReqInput(history=tuple(history), weight_version=weight_version), RestoreOutcome))

    async def save(self, path: str, *, float32: bool = False) -> SaveOutcome:
        return await self._send(MezoSaveReqInput(path=path, float32=float32), SaveOutcome)

    async def fingerprints(self) -> tuple[ReplicaFingerprint, ...]:
        return tuple(r.outcome for r in await self.replies(MezoFingerprintReqInput(), ReplicaFingerprint))

    async def replicas(self) -> int:
        return int(self.tm.server_args.dp_size or 1)

    async def _send(self, request, expected: type[_O]) -> _O:
        """The replicas' one answer: replica 0's, once every replica's agrees with it (see :func:`agreed`)."""
        return agreed([r.outcome for r in await self.replies(request, expected)])

    async def replies(self, request, expected: type[_O]) -> list[MezoReqOutput]:
        """One reply per replica (SGLang's fan-out communicator waits for each), in replica order."""
        self.tm.auto_create_handle_loop()
        communicator = getattr(self.tm, f"{COMMUNICATOR}_communicator")
        replies = sorted(await communicator(request), key=lambda r: r.dp_rank)
        if not replies:
            raise Unavailable("no scheduler answered")
        for reply in replies:
            if not isinstance(reply.outcome, expected):
                raise Unavailable(f"the scheduler answered a {type(request).__name__} with a "
                                  f"{type(reply.outcome).__name__}")
        return replies

    def relabelled(self, outcome: _Moved) -> _Moved:
        """Weights that moved have a new label: what /model_info and responses without spans report."""
        if outcome.weight_version:
            self.tm._update_weight_version_if_provided(outcome.weight_version)
        return outcome


def agreed(outcomes: Sequence[_O]) -> _O:
    """The replicas' common outcome (replica 0's first). Replicas that moved in lockstep report the same steps, the
    same losses and coefficients, the same label and the same consistency; a failure is reported by whichever
    replica had it (the others say only that another replica failed). Replicas that disagree about what their
    weights did are no longer one model: that is reported as inconsistent weights, with no step kept, so the
    runner restores every replica to the last committed history."""
    first = outcomes[0]
    failed = next((o for o in outcomes if getattr(o, "failure", None) is not None and not o.failure.elsewhere),
                  None)
    chosen = failed or first
    if isinstance(first, ChunkOutcome | RestoreOutcome):
        seen = {_moved(o) for o in outcomes}
        if len(seen) > 1:
            logger.error("MeZO: the replicas disagree about a %s: %s", type(first).__name__, seen)
            moved = dataclasses.replace(first, failure=Failure(
                FailureKind.WEIGHTS_INCONSISTENT, f"the {len(outcomes)} replicas disagree about what their weights "
                                                  "did; restoring them"), weights_consistent=False)
            return moved if isinstance(first, RestoreOutcome) else dataclasses.replace(moved, reports=(),
                                                                                       aborted=None)
    return chosen


def _moved(outcome: ChunkOutcome | RestoreOutcome) -> tuple:
    """What must be equal on every replica: what the weights did, not how long it took or why it failed."""
    if isinstance(outcome, RestoreOutcome):
        return (outcome.failure is None, outcome.weights_consistent, outcome.weight_version)
    return (tuple((r.step, r.result) for r in outcome.reports), outcome.aborted, outcome.failure is None,
            outcome.weights_consistent, outcome.weight_version)


class TokenizerManagerScorer:
    """Implements :class:`sglang_mezo.protocol.ServedScorer`: sequences go through SGLang's own request path, as
    user traffic: batched with it, through the prefix cache (which only ever holds KV of the served weights), at
    whichever committed step is served."""

    BATCH = 64
    """Sequences per request: bounds one request's KV and memory."""

    def __init__(self, tokenizer_manager, *, adapter: str | None = None,
                 versions: dict[str, AdapterVersion] | None = None) -> None:
        self.tm = tokenizer_manager
        self.adapter = adapter
        self.versions: dict[str, AdapterVersion] = {} if versions is None else versions
        """The executor's ``adapters``: the version each trained adapter's name serves now."""

    def under(self, adapter: str) -> TokenizerManagerScorer:
        return TokenizerManagerScorer(self.tm, adapter=adapter, versions=self.versions)

    def _lora(self) -> str | None:
        """The name to send as ``lora_path``: the adapter once it has a version (before, a fresh adapter computes
        the base's function exactly: B = 0)."""
        return self.adapter if self.adapter in self.versions else None

    def _version(self, meta: dict) -> str:
        return self.versions[self.adapter].label if self._lora() else str(meta["weight_version"])

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
                lora_path=self._lora(),
            )
            outputs = await self._first(request)
            for out, item in zip(outputs, chunk, strict=True):
                meta = out["meta_info"]
                sums.append(math.fsum(e[0] for e in meta["input_token_logprobs"][1:]))
                versions.add(self._version(meta))
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
                lora_path=self._lora(),
            )
            outputs = await self._first(request)
            decode = self.tm.tokenizer.decode
            out += [(o["text"], decode(list(i.completion_ids), skip_special_tokens=True))
                    for o, i in zip(outputs, chunk, strict=True)]
        return out
