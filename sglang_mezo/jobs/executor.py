"""The interface between jobs and whatever runs steps on the served weights (the plugin implements it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sglang_mezo.core.interface import CompletionScores, ScoringItem
from sglang_mezo.core.objectives import ChoiceExample, CompletionExample


def example_from_wire(data: dict) -> CompletionExample | ChoiceExample:
    """A tokenized example as jobs carry it: ``{"prompt": ids, "completion": ids}`` or ``{"prompt": ids,
    "options": [ids, ...], "label": i}``."""
    if "options" in data:
        return ChoiceExample(tuple(data["prompt"]), tuple(tuple(o) for o in data["options"]), int(data["label"]))
    return CompletionExample(tuple(data["prompt"]), tuple(data["completion"]))


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
    info: dict = field(default_factory=dict)


class ChunkExecutor(Protocol):
    async def run_chunk(self, chunk: StepChunk) -> ChunkOutcome:
        """Run the chunk's steps atomically with respect to serving; report every committed step."""
        ...

    async def drain(self, timeout_s: float) -> None:
        """Wait until the user requests in flight now have finished, or ``timeout_s`` has passed."""
        ...

    async def restore(self, history: list[dict], weight_version: str) -> ChunkOutcome:
        """Put the served weights at the base checkpoint plus ``history`` (``Trajectory.to_dict()`` per job, in
        order), exactly, and label them ``weight_version``."""
        ...

    async def save(self, path: str) -> ChunkOutcome:
        """Write the served weights to ``path`` as a Hugging Face checkpoint; ``info`` names the saved label."""
        ...


class ServedScorer(Protocol):
    async def score(self, items: Sequence[ScoringItem]) -> tuple[CompletionScores, set[str]]:
        """Score the items as user traffic is served; also the weight versions that scored them (more than one
        if a step committed meanwhile)."""
        ...

    async def generate(self, items: Sequence[ScoringItem]) -> list[tuple[str, str]]:
        """Per item: the greedy generation after its prompt (no longer than its completion, in tokens) and the
        completion, both as text."""
        ...


def weight_version_label(job_id: str, committed_steps: int, aborted: bool = False) -> str:
    """SGLang's ``weight_version`` for the weights after ``committed_steps`` steps of job ``job_id``: one label per
    bit-exact state (a failed step's probe round trip is a state of its own). Responses report it per token span
    (``meta_info["weight_versions"]``), so a client can tell which step served which tokens."""
    return f"mezo-{job_id}-{committed_steps}" + ("-aborted" if aborted else "")
