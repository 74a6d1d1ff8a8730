"""The contract between the job runner (HTTP process) and what runs steps on the served weights (SGLang's
scheduler, or a fake in the unit tests): one typed record per message, and the interfaces the runner calls.

    runner --StepChunk--> executor --(IPC)--> scheduler: run_step() per step --> ChunkOutcome --> runner
    runner --history of Trajectory--> executor.restore --> RestoreOutcome
    runner --path--> executor.save --> SaveOutcome

Every field is a core type or a plain value: the records cross the process boundary as they are (SGLang pickles
its control messages, see :mod:`sglang_mezo.scheduler.messages`), so there is no second, untyped wire format to
keep in step with them. This module imports the core only; the job runner and the scheduler side both import it,
and neither imports the other.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.estimators import INITIAL_STATE, AdaptiveState
from sglang_mezo.core.interface import CompletionScores, ScoringItem
from sglang_mezo.core.lora import LoraSpec
from sglang_mezo.core.objectives import Example, Objective
from sglang_mezo.core.spsa import AbortedProbes, StepResult
from sglang_mezo.core.trajectory import Trajectory


class FailureKind(str, enum.Enum):
    """Why a message to the executor did not do what it asked. The kind decides what the runner does next and
    what HTTP status a client gets (:mod:`sglang_mezo.server.errors`); the message says what happened."""

    INVALID = "invalid"
    """The request cannot run as given (a chunk or history that does not fit the served model)."""
    STEP_FAILED = "step_failed"
    """A step failed (the scorer raised, a loss was not finite, the batch did not fit the KV pool, another
    tensor-parallel rank failed); its probe was taken off, so the weights are at the last committed step."""
    WEIGHTS_INCONSISTENT = "weights_inconsistent"
    """A pass over the weights failed part-way: they are at no committed step until a restore succeeds."""
    TRAINING_DISABLED = "training_disabled"
    """An earlier inconsistency was not restored yet: nothing that reads or moves the weights runs."""
    CHECKPOINT = "checkpoint"
    """Reading the base checkpoint or writing a saved one failed."""
    INTERNAL = "internal"
    """A bug: something raised that nothing expected (the runner logs it)."""
    INTERRUPTED = "interrupted"
    """The server stopped during the job (a restart read it back from the journal with the steps it committed)."""


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str
    elsewhere: bool = False
    """Another rank's or replica's failure, reported by this one: the HTTP side names the one that had it."""


@dataclass(frozen=True)
class AdapterTarget:
    """The LoRA adapter a job trains instead of the served weights: the name it is served under and what it is."""

    name: str
    spec: LoraSpec
    probes_in_one_batch: bool = True
    """False: each probe adapter scored in a forward of its own (the comparison the batched path is measured
    against)."""


@dataclass(frozen=True)
class AdapterVersion:
    """A committed version of a trained adapter, as SGLang serves it: requests that name ``name`` are scored with
    SGLang's adapter ``lora_id`` (a fresh id per version, so the radix cache, keyed by it, never mixes versions)."""

    name: str
    lora_id: str
    committed_steps: int
    label: str
    """The version's label (:func:`weight_version_label` of the job and its committed steps)."""


@dataclass(frozen=True)
class StepChunk:
    """Steps of one job for the scheduler to run back to back, with no user batch in between."""

    job_id: str
    config: MezoConfig
    """Step k's seeds derive from ``config.seed``; its lr from ``config``'s schedule."""
    objective: Objective
    steps: tuple[int, ...]
    """0-based step indices, consecutive."""
    batches: tuple[tuple[Example, ...], ...]
    """Per step, its tokenized examples."""
    adaptive: AdaptiveState = INITIAL_STATE
    """The step-size rule's state after the job's last committed step, which the chunk's first step continues
    from (the initial state for a job's first chunk, and always for a config without a rule)."""
    adapter: AdapterTarget | None = None
    """The adapter the steps train (None: the served weights)."""

    def __post_init__(self) -> None:
        if not self.steps or len(self.steps) != len(self.batches):
            raise ValueError(f"a chunk needs one batch per step: {len(self.steps)} steps, {len(self.batches)} batches")
        if list(self.steps) != list(range(self.steps[0], self.steps[0] + len(self.steps))):
            raise ValueError(f"a chunk's steps must be consecutive, got {self.steps}")

    def weight_version_after(self, reports: Sequence[StepReport], aborted: AbortedStep | None) -> str | None:
        """The label of the weights after this chunk committed ``reports`` and, with ``aborted``, a failed step's
        probe passes (see :func:`weight_version_label`); None if the weights did not move."""
        if not reports and aborted is None:
            return None
        return weight_version_label(self.job_id, reports[-1].step + 1 if reports else self.steps[0],
                                    aborted is not None)


@dataclass(frozen=True)
class StepReport:
    """A committed step as the job records it: the core's result, where it sits, and how long serving waited."""

    step: int
    result: StepResult
    step_ms: float
    """Wall time of the step inside the scheduler, during which user batches wait."""


@dataclass(frozen=True)
class AbortedStep:
    """A step that failed after perturbing: the probe passes it made and took off (for the trajectory)."""

    step: int
    probes: AbortedProbes


@dataclass(frozen=True)
class ChunkOutcome:
    """What a chunk did. ``reports`` holds every committed step, in order, also when a later step failed."""

    reports: tuple[StepReport, ...] = ()
    aborted: AbortedStep | None = None
    failure: Failure | None = None
    weights_consistent: bool = True
    """False when a weight pass failed part-way (on any rank): the runner must restore the weights."""
    trainable_fingerprint: str = ""
    trainable_names: tuple[str, ...] = ()
    """The trainable set's header, for the job's trajectory."""
    weight_version: str | None = None
    """The label SGLang now serves the weights with, if they changed."""
    adapter_version: AdapterVersion | None = None
    """For an adapter job: the version the chunk's last committed step made, registered in the scheduler (the
    executor makes requests by the adapter's name use it)."""


@dataclass(frozen=True)
class RestoreOutcome:
    failure: Failure | None = None
    weights_consistent: bool = True
    """False when the restore itself failed part-way: the weights are at no known state."""
    message: str = ""
    """What was done (elements re-read, steps replayed, time)."""
    weight_version: str | None = None


@dataclass(frozen=True)
class SaveOutcome:
    failure: Failure | None = None
    weight_version: str = ""
    """The label of the weights that were written."""
    tensors: tuple[str, ...] = ()
    """The checkpoint tensors written from the served weights (the others are the base checkpoint's)."""
    message: str = ""


@dataclass(frozen=True)
class AdapterRetired:
    """What a retire message unloaded (adapter versions by id) and whose training state it dropped."""

    retired: tuple[str, ...] = ()
    job_id: str | None = None


@dataclass(frozen=True)
class ReplicaFingerprint:
    """One replica's digest of the weights jobs can move, as its TP rank 0 holds them (see
    :func:`~sglang_mezo.core.params.weights_digest`)."""

    dp_rank: int
    tp_rank: int
    digest: str
    tensors: int
    """How many checkpoint tensors the digest covers."""
    weight_version: str
    consistent: bool = True
    """False while the replica's weights are at no committed step (training disabled until a restore)."""
    exchanged_bytes: int = 0
    """What this replica's TP rank 0 has put into the replicas' collectives since launch (payload bytes; 0 with
    one replica)."""
    exchanges: int = 0
    """How many collectives that was."""
    server: int = 0
    """The server of a fleet that holds the replica (its ``--mezo-fleet-rank``; 0 outside a fleet)."""


@dataclass(frozen=True)
class FleetSpan:
    """The group the scheduler processes of a fleet's servers form for the jobs to come (sent by the leader to every
    member when the members change): where to meet, and where this server's replicas sit in it."""

    address: str
    """``host:port`` of the rendezvous, hosted by the leader's first scheduler process."""
    group: str
    """The group's name: the leader's launch and how many groups it formed, so a re-formed group (or one formed by
    a restarted leader) never meets an old one."""
    first_replica: int
    """The fleet-wide index of this server's replica 0; its replica r is ``first_replica + r``."""
    replicas: int
    """Replicas in the whole fleet: every job from now on splits its steps' batches between them."""


@dataclass(frozen=True)
class FleetJoined:
    """A scheduler process's answer to a :class:`FleetSpan`: where it now sits (or the failure to join)."""

    failure: Failure | None = None
    dp_rank: int = 0
    dp_size: int = 1


Outcome = ChunkOutcome | RestoreOutcome | SaveOutcome | AdapterRetired | ReplicaFingerprint | FleetJoined


def weight_version_label(job_id: str, committed_steps: int, aborted: bool = False) -> str:
    """SGLang's ``weight_version`` for the weights after ``committed_steps`` steps of job ``job_id``: one label per
    bit-exact state (a failed step's probe round trip is a state of its own). Responses report it per token span
    (``meta_info["weight_versions"]``), so a client can tell which step served which tokens."""
    return f"mezo-{job_id}-{committed_steps}" + ("-aborted" if aborted else "")


class ChunkExecutor(Protocol):
    """What the job runner needs from whatever holds the served weights (the plugin implements it over SGLang's
    IPC, :class:`sglang_mezo.server.sglang_adapters.TokenizerManagerExecutor`)."""

    async def run_chunk(self, chunk: StepChunk) -> ChunkOutcome:
        """Run the chunk's steps atomically with respect to serving; report every committed step."""
        ...

    async def drain(self, timeout_s: float) -> None:
        """Wait until the user requests in flight now have finished, or ``timeout_s`` has passed."""
        ...

    async def restore(self, history: Sequence[Trajectory], weight_version: str) -> RestoreOutcome:
        """Put the served weights at the base checkpoint plus ``history`` (one trajectory per job, in order),
        exactly, and label them ``weight_version``."""
        ...

    async def save(self, path: str, *, float32: bool = False) -> SaveOutcome:
        """Write the served weights to ``path`` as a Hugging Face checkpoint (the trained tensors in fp32 with
        ``float32``, else in the base checkpoint's dtype)."""
        ...

    async def end_adapter_job(self, job_id: str) -> None:
        """An adapter job ended (any way): its training state may go; the versions it published keep serving."""
        ...

    async def fingerprints(self) -> tuple[ReplicaFingerprint, ...]:
        """Each replica's digest of the weights jobs can move, in replica order, computed now."""
        ...

    async def replicas(self) -> int:
        """How many replicas share the steps of a job on the served weights that starts now (the job's
        ``shards``): the server's ``--dp-size``, or every replica of a fleet's servers, gathered now."""
        ...


class ServedScorer(Protocol):
    """Scoring and generation as user traffic is served (for evaluations)."""

    async def score(self, items: Sequence[ScoringItem]) -> tuple[CompletionScores, set[str]]:
        """Score the items; also the weight versions that scored them (more than one if a step committed
        meanwhile)."""
        ...

    def under(self, adapter: str) -> ServedScorer:
        """The same scorer for requests that name a trained adapter (its committed version; the base, whose function
        a fresh adapter computes exactly, before its first commit)."""
        ...

    async def generate(self, items: Sequence[ScoringItem]) -> list[tuple[str, str]]:
        """Per item: the greedy generation after its prompt (no longer than its completion, in tokens) and the
        completion, both as text."""
        ...
