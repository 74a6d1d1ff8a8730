"""SGLang's envelopes for our messages between the HTTP process and the scheduler(s).

Each envelope carries one record of :mod:`sglang_mezo.protocol` and nothing else: the records are the messages,
the envelopes only make them SGLang IPC requests (``io_struct.BaseReq`` subclasses, dispatched by type). SGLang
sends control messages with pickle (``SGLANG_USE_PICKLE_IPC``, on by default; ``--enable-mezo`` refuses to start
with it off) and its tensor-parallel broadcast always pickles, so the records travel as the dataclasses they are.
These classes must be importable from every process: they are. Every request is answered with one
:class:`MezoReqOutput`.
"""

from __future__ import annotations

from sglang.srt.managers.io_struct import BaseReq

from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.protocol import FleetSpan, Outcome, StepChunk


class MezoChunkReqInput(BaseReq, kw_only=True):
    chunk: StepChunk


class MezoRestoreReqInput(BaseReq, kw_only=True):
    history: tuple[Trajectory, ...]
    """The trajectory of each job whose steps the served weights should carry, in the order they ran (empty: the
    base checkpoint)."""
    weight_version: str
    """SGLang's weight version label of the restored weights."""


class MezoSaveReqInput(BaseReq, kw_only=True):
    path: str
    """A folder every TP rank can write to (they share it): the served weights go there as an HF checkpoint."""
    float32: bool = False
    """The trained tensors in fp32 (else in the base checkpoint's dtype)."""


class MezoAdapterRetireReqInput(BaseReq, kw_only=True):
    lora_ids: tuple[str, ...] = ()
    """Adapter versions no request uses any more: unloaded from SGLang's LoRA manager."""
    job_id: str | None = None
    """A finished adapter job: its training state (master, probe adapters) is dropped."""


class MezoFingerprintReqInput(BaseReq, kw_only=True):
    """Asks every replica for the digest of its trainable weights (``GET /mezo/weights?fingerprint=1``)."""


class MezoFleetReqInput(BaseReq, kw_only=True):
    """Join the fleet's group described by ``span`` (every scheduler process of every member gets it at once)."""

    span: FleetSpan


class MezoReqOutput(BaseReq, kw_only=True):
    outcome: Outcome
    dp_rank: int = 0
    """The replica that answered (each replica's TP rank 0 answers every message)."""
