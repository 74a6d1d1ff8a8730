"""What the served weights *are*: the base checkpoint plus the trajectories of the jobs that ran, in order, and the
operations that put them somewhere else wholesale (restore, recovery after a torn weight pass, save).

Every state of the weights has one SGLang weight-version label (:func:`sglang_mezo.protocol.weight_version_label`),
and every state can be rebuilt exactly: re-read the trainable tensors, replay the history.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.protocol import ChunkExecutor, ReplicaFingerprint, weight_version_label

from .errors import Conflict, Unavailable, error_for
from .journal import Journal, JournalWriteError, Segment

logger = logging.getLogger(__name__)

PROVENANCE = "mezo_history.json"
"""Written next to saved weights: the base model, the weight version, and the trajectories that lead there."""


@dataclass(frozen=True)
class ServedSegment:
    """One job's part of the served weights: its trajectory, or the first steps of it after a reset."""

    job_id: str
    trajectory: Trajectory

    @property
    def steps(self) -> int:
        return self.trajectory.committed_steps

    def journaled(self) -> Segment:
        """As the journal keeps it: the job and how many of its records."""
        return Segment(self.job_id, len(self.trajectory.records))

    @property
    def weight_version(self) -> str:
        """The label of the weights after this segment (one label per bit-exact state)."""
        records = self.trajectory.records
        return weight_version_label(self.job_id, self.steps, bool(records) and not records[-1].committed)


@dataclass(frozen=True)
class SaveReport:
    weight_version: str
    tensors: tuple[str, ...]
    message: str


class ServedWeights:
    def __init__(self, executor: ChunkExecutor, *, base_weight_version: str = "default", base_model: str = "",
                 journal: Journal | None = None) -> None:
        self.executor = executor
        self.journal = journal
        self.base_weight_version = base_weight_version
        self.base_model = base_model
        self.segments: list[ServedSegment] = []
        """The served weights = the base checkpoint + these trajectories, replayed in order."""
        self.lost = False
        """A weight pass failed part-way and the restore failed too: the weights are at no known state."""
        self.lock = asyncio.Lock()
        """Held by a running job and by a reset: a job starts on the weights a reset left, never during one."""

    @property
    def weight_version(self) -> str:
        """SGLang's label of the weights served now: that of the last segment (the same label the scheduler gives
        them at each commit and restore)."""
        return self.segments[-1].weight_version if self.segments else self.base_weight_version

    def carry(self, job_id: str, trajectory: Trajectory) -> None:
        """The served weights now carry (some of) ``trajectory``'s steps: it is the last segment from now on."""
        if not any(s.trajectory is trajectory for s in self.segments):
            self.segments.append(ServedSegment(job_id, trajectory))

    async def restore(self, history: Sequence[ServedSegment]) -> str:
        """Put the weights at ``history`` exactly; the executor's report. Raises if it failed (and marks the
        weights lost if the failure left them at no known state)."""
        version = history[-1].weight_version if history else self.base_weight_version
        outcome = await self.executor.restore([segment.trajectory for segment in history], version)
        if outcome.failure is not None:
            self.lost = not outcome.weights_consistent
            raise error_for(outcome.failure, "restoring the weights")
        self.segments, self.lost = list(history), False
        if self.journal is not None:
            try:
                await asyncio.to_thread(self.journal.served, [segment.journaled() for segment in self.segments])
            except JournalWriteError as exc:
                raise Unavailable(f"the weights were restored, but {exc}") from exc
        return outcome.message

    async def recover(self) -> str:
        """After a weight pass failed part-way: back to the last committed step, exactly. Says what happened."""
        logger.warning("MeZO: restoring the weights after a failed weight pass")
        try:
            return "the weights were restored to the last committed step: " + await self.restore(self.segments)
        except Exception as exc:  # noqa: BLE001 - reported in the job and in /mezo/weights
            logger.error("MeZO: %s", exc)
            return f"{exc}; training stays disabled until POST /mezo/reset succeeds"

    async def fingerprints(self) -> tuple[ReplicaFingerprint, ...]:
        """Each replica's digest of the weights jobs can move, computed now (equal digests: equal bytes)."""
        return await self.executor.fingerprints()

    async def save(self, path: str, *, float32: bool = False) -> SaveReport:
        """Write the served weights to ``path`` (a folder) as a Hugging Face checkpoint that transformers and SGLang
        load, plus ``mezo_history.json``: the trajectories that lead from the base checkpoint to them. ``float32``
        writes the trained tensors in fp32 instead of the base checkpoint's dtype."""
        if self.lost:
            raise Conflict("the served weights are at no committed step (a restore failed): reset them first")
        outcome = await self.executor.save(path, float32=float32)
        if outcome.failure is not None:
            raise error_for(outcome.failure, "saving the weights")
        # the served history as of the save: the scheduler handles messages in order, and a running job's
        # history may have moved on since; the label written by the scheduler says which weights these are
        history = self.history_at(outcome.weight_version)
        provenance = {"base_model": self.base_model, "weight_version": outcome.weight_version,
                      "history": None if history is None else [s.trajectory.to_dict() for s in history]}
        try:
            Path(path, PROVENANCE).write_text(json.dumps(provenance))
        except OSError as exc:
            raise Unavailable(f"the weights were saved, but not their history: {exc}") from exc
        return SaveReport(outcome.weight_version, outcome.tensors, outcome.message)

    def history_at(self, version: str) -> list[ServedSegment] | None:
        """The served history whose weights carry ``version`` (None if it is not the current one or a prefix)."""
        if version == self.base_weight_version:
            return []
        for n, segment in enumerate(self.segments):
            if segment.weight_version == version:
                return self.segments[: n + 1]
        return None
