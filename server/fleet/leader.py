"""The fleet's leader: runs the jobs, and sends every message that moves the weights to the members too.

:class:`FleetLeader` is the leader's :class:`~sglang_mezo.protocol.ChunkExecutor`. When a job on the served weights
starts (:meth:`FleetLeader.replicas`) it brings every member that joined to the leader's weights (a member whose
label differs replays the leader's history), forms the group of every member's scheduler processes if the members
changed, and gives the job that many replicas: from then on each chunk, restore and save goes to the leader's
schedulers and to every member at once, and the replies of all must agree (:func:`~..sglang_adapters.agreed`),
exactly as the replicas of one server's do. A member that does not answer fails the message it was sent, is left
out of the next group, and comes back by joining again (members re-join every :data:`~.follower.HEARTBEAT_S`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.jobs.errors import InvalidRequest, Unavailable
from sglang_mezo.protocol import (
    ChunkOutcome,
    Failure,
    FailureKind,
    FleetJoined,
    FleetSpan,
    ReplicaFingerprint,
    RestoreOutcome,
    SaveOutcome,
    StepChunk,
)
from sglang_mezo.scheduler.messages import (
    MezoChunkReqInput,
    MezoFingerprintReqInput,
    MezoFleetReqInput,
    MezoReqOutput,
    MezoRestoreReqInput,
    MezoSaveReqInput,
)

from ..sglang_adapters import TokenizerManagerExecutor, agreed
from .records import History, Join, Joined, MemberState
from .relay import Relay

logger = logging.getLogger(__name__)

RELAY_ROUTE = "/mezo/fleet/relay"

_O = TypeVar("_O", ChunkOutcome, RestoreOutcome, SaveOutcome, ReplicaFingerprint, FleetJoined)


@dataclass
class Member:
    join: Join
    weight_version: str
    """The label of the weights it serves, as far as the leader knows."""
    in_group: bool = False

    @property
    def rank(self) -> int:
        return self.join.rank

    def state(self) -> MemberState:
        return MemberState(self.rank, self.join.url, self.join.replicas, self.weight_version, self.in_group)


class FleetLeader:
    def __init__(self, local: TokenizerManagerExecutor, relay: Relay, *, host: str, size: int, tp_size: int) -> None:
        self.local = local
        self.relay = relay
        self.host = host
        """Where the leader's first scheduler process hosts the group's rendezvous (the fleet address's host)."""
        self.size = size
        self.tp_size = tp_size
        self.instance = uuid.uuid4().hex[:12]
        self.members: dict[int, Member] = {}
        self.epoch = 0
        self._formed: tuple[tuple[int, str], ...] | None = ()
        """(rank, instance) of the members in the group now; () the leader's replicas alone; None: re-form it."""
        self._served: Callable[[], History] | None = None
        self._membership = asyncio.Lock()
        """Held while members are brought to the leader's weights or the group is formed: one change at a time."""
        self._syncs: dict[int, asyncio.Task] = {}

    @property
    def adapters(self):
        return self.local.adapters

    def attach(self, served: Callable[[], History]) -> None:
        """Where the leader's served history is read (its job runner's, made after this executor)."""
        self._served = served

    def history(self) -> History:
        assert self._served is not None, "attach() the served history first"
        return self._served()

    # -- members -------------------------------------------------------------------------------------------------

    def join(self, join: Join) -> Joined:
        """A server asks to take part (again: members re-join now and then). A new one, or one that restarted, is
        brought to the leader's weights now (in the background) and shares the steps of the jobs that start from
        then on."""
        if not 1 <= join.rank < self.size:
            raise InvalidRequest(f"fleet rank {join.rank}: the members of this fleet are ranks 1 to {self.size - 1}")
        if join.tp_size != self.tp_size:
            raise InvalidRequest(f"fleet rank {join.rank} runs --tp {join.tp_size}, the leader --tp {self.tp_size}: "
                                 "a fleet's servers shard the model alike")
        known = self.members.get(join.rank)
        if known is None or dataclasses.replace(known.join, weight_version="") != \
                dataclasses.replace(join, weight_version=""):
            if known is not None and known.in_group:
                self._formed = None
            self.members[join.rank] = Member(join, join.weight_version)
            logger.info("MeZO fleet: server %d joined from %s (%d replica(s), serving %s)", join.rank, join.url,
                        join.replicas, join.weight_version)
            self._sync_later(join.rank)
        return Joined(self.history().weight_version)

    def states(self) -> list[MemberState]:
        return [self.members[rank].state() for rank in sorted(self.members)]

    def _drop(self, member: Member, why: str) -> None:
        if self.members.get(member.rank) is member:
            del self.members[member.rank]
            logger.warning("MeZO fleet: server %d (%s) is left out until it joins again: %s", member.rank,
                           member.join.url, why)
        if member.in_group:
            self._formed = None

    def _sync_later(self, rank: int) -> None:
        """Bring member ``rank`` to the leader's weights in the background (once at a time per member)."""
        if rank in self._syncs:
            return

        async def sync() -> None:
            try:
                async with self._membership:
                    member = self.members.get(rank)
                    if member is not None and not member.in_group:
                        await self._sync(member)
            finally:
                self._syncs.pop(rank, None)

        self._syncs[rank] = asyncio.get_running_loop().create_task(sync(), name=f"sglang-mezo-fleet-sync-{rank}")

    def _sync_outsiders(self) -> None:
        """Members outside the group (they joined during a job) follow the leader's weights after each change."""
        for member in list(self.members.values()):
            if not member.in_group:
                self._sync_later(member.rank)

    async def _sync(self, member: Member) -> bool:
        """Bring ``member`` to the leader's weights if its label differs: it leaves any group it was in (its
        schedulers would wait for peers there) and replays the leader's history onto its base checkpoint. Called
        with the membership lock held."""
        history = self.history()
        if member.weight_version == history.weight_version:
            return True
        try:
            await self._send(member, MezoFleetReqInput(span=FleetSpan("", "", 0, member.join.replicas)), FleetJoined)
            outcome = agreed([r.outcome for r in await self._send(
                member, MezoRestoreReqInput(history=history.trajectories, weight_version=history.weight_version),
                RestoreOutcome)])
        except Unavailable as exc:
            self._drop(member, str(exc))
            return False
        if outcome.failure is not None:
            self._drop(member, f"replaying the leader's history failed: {outcome.failure.message}")
            return False
        if member.in_group:
            member.in_group, self._formed = False, None
        member.weight_version = history.weight_version
        logger.info("MeZO fleet: server %d now serves %s (%s)", member.rank, history.weight_version, outcome.message)
        return True

    # -- the group ---------------------------------------------------------------------------------------------

    async def replicas(self) -> int:
        """At a job's start (the weights' lock held): every member that answers at the leader's weights, in one
        group with the leader's schedulers; the replicas they hold together."""
        own = await self.local.replicas()
        async with self._membership:
            for member in list(self.members.values()):
                if not await self.relay.alive(member.join.url):  # a rendezvous would wait for it until it times out
                    self._drop(member, "it does not answer /health")
                else:
                    await self._sync(member)  # drops it if it cannot be brought to the leader's weights
            wanted = self._wanted()
            while wanted != self._formed:
                wanted = await self._form(own, wanted)
            return own + sum(self.members[rank].join.replicas for rank, _ in wanted)

    def _wanted(self) -> tuple[tuple[int, str], ...]:
        return tuple(sorted((m.rank, m.join.instance) for m in self.members.values()))

    async def _form(self, own: int, wanted: tuple[tuple[int, str], ...]) -> tuple[tuple[int, str], ...]:
        """Form the group of the leader's and ``wanted``'s scheduler processes; the members that could not join are
        dropped, and what is left is returned (the group to form again, if any failed)."""
        self.epoch += 1
        group = f"sglang-mezo-fleet-{self.instance}-{self.epoch}"
        members = [self.members[rank] for rank, _ in wanted]
        for member in self.members.values():
            member.in_group = False
        if not members:  # the leader's replicas alone again
            await self._local(MezoFleetReqInput(span=FleetSpan("", "", 0, own)), FleetJoined)
            self._formed = ()
            return ()
        total = own + sum(m.join.replicas for m in members)
        address = f"{self.host}:{_free_port(self.host)}"
        sends, first = [self._local(MezoFleetReqInput(span=FleetSpan(address, group, 0, total)), FleetJoined)], own
        for member in members:
            sends.append(self._send(member, MezoFleetReqInput(span=FleetSpan(address, group, first, total)),
                                    FleetJoined))
            first += member.join.replicas
        logger.info("MeZO fleet: forming group %d at %s: the leader and server(s) %s, %d replicas", self.epoch,
                    address, [m.rank for m in members], total)
        results = await asyncio.gather(*sends, return_exceptions=True)
        if _why(results[0]):
            self._formed = None
            raise Unavailable(f"the leader's schedulers could not form the fleet's group: {_why(results[0])}")
        failed = [(m, _why(r)) for m, r in zip(members, results[1:], strict=True) if _why(r)]
        for member, why in failed:
            self._drop(member, f"it could not join the group: {why}")
        if failed:
            self._formed = None
            return self._wanted()
        for member in members:
            member.in_group = True
        self._formed = wanted
        return wanted

    def _group(self) -> list[Member]:
        return [m for m in self.members.values() if m.in_group] if self._formed else []

    # -- ChunkExecutor ---------------------------------------------------------------------------------------------

    async def run_chunk(self, chunk: StepChunk) -> ChunkOutcome:
        if chunk.adapter is not None or not self._group():
            outcome = await self.local.run_chunk(chunk)
        else:
            outcome = self.local.relabelled(await self._everywhere(MezoChunkReqInput(chunk=chunk), ChunkOutcome))
        self._sync_outsiders()
        return outcome

    async def restore(self, history: Sequence[Trajectory], weight_version: str) -> RestoreOutcome:
        if not self._group():
            outcome = await self.local.restore(history, weight_version)
        else:
            outcome = self.local.relabelled(await self._everywhere(
                MezoRestoreReqInput(history=tuple(history), weight_version=weight_version), RestoreOutcome))
        self._sync_outsiders()
        return outcome

    async def save(self, path: str, *, float32: bool = False) -> SaveOutcome:
        # the group's ranks agree at a save too (the leader's replica 0 writes, every other waits)
        if not self._group():
            return await self.local.save(path, float32=float32)
        return await self._everywhere(MezoSaveReqInput(path=path, float32=float32), SaveOutcome)

    async def drain(self, timeout_s: float) -> None:
        await self.local.drain(timeout_s)

    async def end_adapter_job(self, job_id: str) -> None:
        await self.local.end_adapter_job(job_id)

    async def fingerprints(self) -> tuple[ReplicaFingerprint, ...]:
        """The leader's replicas' and every member's (each named by its server's rank); a member that does not
        answer is left out (and out of the next group)."""
        members = list(self.members.values())
        results = await asyncio.gather(self.local.fingerprints(),
                                       *(self._send(m, MezoFingerprintReqInput(), ReplicaFingerprint)
                                         for m in members), return_exceptions=True)
        if isinstance(results[0], BaseException):
            raise results[0]
        prints = list(results[0])
        for member, result in zip(members, results[1:], strict=True):
            if isinstance(result, BaseException):
                self._drop(member, str(result))
                continue
            prints += [dataclasses.replace(r.outcome, server=member.rank) for r in result]
        return tuple(prints)

    async def _everywhere(self, request, expected: type[_O]) -> _O:
        """``request`` to the leader's schedulers and every member in the group at once; their one answer. A
        member that did not answer fails it (it is left out of the next group; the leader's weights are as its
        own schedulers left them)."""
        members = self._group()
        results = await asyncio.gather(self._local(request, expected),
                                       *(self._send(m, request, expected) for m in members), return_exceptions=True)
        if isinstance(results[0], BaseException):
            raise results[0]
        outcomes = [r.outcome for r in results[0]]
        missing = []
        for member, result in zip(members, results[1:], strict=True):
            if isinstance(result, BaseException):
                missing.append(f"fleet server {member.rank} ({member.join.url}) did not answer: {result}")
                self._drop(member, str(result))
                continue
            outcomes += [r.outcome for r in result]
        outcome = agreed(outcomes)
        if isinstance(outcome, ChunkOutcome | RestoreOutcome) and outcome.weight_version and outcome.failure is None:
            for member in self._group():
                member.weight_version = outcome.weight_version
        if missing and outcome.failure is None:
            outcome = dataclasses.replace(outcome, failure=Failure(FailureKind.STEP_FAILED, "; ".join(missing)))
        return outcome

    async def _local(self, request, expected: type[_O]) -> list[MezoReqOutput]:
        return await self.local.replies(request, expected)

    async def _send(self, member: Member, request, expected: type[_O]) -> list[MezoReqOutput]:
        replies = await self.relay.call(member.join.url, RELAY_ROUTE, "relay", request)
        if not isinstance(replies, list) or not all(isinstance(r, MezoReqOutput) and isinstance(r.outcome, expected)
                                                    for r in replies):
            raise Unavailable(f"fleet server {member.rank} answered a {type(request).__name__} with {replies!r:.200}")
        return replies


def _why(result: list[MezoReqOutput] | BaseException) -> str | None:
    """Why a send failed (it raised, or a scheduler answered with a failure); None if it did not."""
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"
    return "; ".join(r.outcome.failure.message for r in result if r.outcome.failure is not None) or None


def _free_port(host: str) -> int:
    """A port free now on the leader's host for the group's rendezvous (its first scheduler process binds it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
