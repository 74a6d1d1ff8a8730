"""The interface between jobs and whatever runs steps on the served weights (the plugin implements it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class StepChunk:
    job_id: str
    config: dict
    objective: str
    steps: list[int]
    batches: list[list[dict]]


@dataclass(frozen=True)
class ChunkOutcome:
    success: bool
    message: str = ""
    results: list[dict] = field(default_factory=list)
    inconsistent: bool = False
    aborted: dict | None = None
    """A step that failed after perturbing: its probe passes (``{"step", "seeds", "eps", "passes"}``)."""
    trainable_fingerprint: str = ""
    trainable_names: list[str] = field(default_factory=list)


class ChunkExecutor(Protocol):
    async def run_chunk(self, chunk: StepChunk) -> ChunkOutcome:
        """Run the chunk's steps atomically with respect to serving; report every committed step."""
        ...

    async def drain(self, timeout_s: float) -> None:
        """Wait until the user requests in flight now have finished, or ``timeout_s`` has passed."""
        ...

    async def restore(self, history: list[dict]) -> ChunkOutcome:
        """Put the served weights at the base checkpoint plus ``history`` (``Trajectory.to_dict()`` per job, in
        order), exactly."""
        ...
