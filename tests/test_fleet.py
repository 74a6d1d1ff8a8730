"""A fleet's parts without servers: the signed wire format, the --mezo-fleet-* flags, and the leader's membership
(joins, re-syncs, forming the group, a member that stops answering), over a fake local executor and a fake relay
at our own interfaces. The servers themselves: tests/test_fleet_server.py."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import pickle

import pytest

from sglang_mezo.jobs.errors import InvalidRequest, Unavailable
from sglang_mezo.options import add_cli_args, from_namespace
from sglang_mezo.protocol import (
    ChunkOutcome,
    Failure,
    FailureKind,
    FleetJoined,
    FleetSpan,
    ReplicaFingerprint,
    RestoreOutcome,
    StepChunk,
)
from sglang_mezo.scheduler.messages import (
    MezoChunkReqInput,
    MezoFingerprintReqInput,
    MezoFleetReqInput,
    MezoReqOutput,
    MezoRestoreReqInput,
)
from sglang_mezo.server.fleet import wire
from sglang_mezo.server.fleet.leader import FleetLeader
from sglang_mezo.server.fleet.records import History, Join
from sglang_mezo.server.fleet.relay import FleetUnreachable
from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import Objective

SECRET = b"0123456789abcdef-fleet"


# -- the wire ------------------------------------------------------------------------------------------------------

def test_a_sealed_record_opens_only_with_the_secret_for_its_purpose_and_while_fresh(monkeypatch):
    record = Join(1, "http://127.0.0.1:1", 1, 1, "default", "abc")
    sealed = wire.seal("join", record, SECRET)
    assert wire.unseal("join", sealed, SECRET) == record
    with pytest.raises(wire.Unsigned, match="not signed"):
        wire.unseal("join", sealed, b"another fleet's secret")
    with pytest.raises(wire.Unsigned, match="not signed"):  # a reply cannot be replayed as a request
        wire.unseal("relay", sealed, SECRET)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(wire.Unsigned):
        wire.unseal("join", tampered, SECRET)
    with pytest.raises(wire.Unsigned, match="not a signed"):
        wire.unseal("join", pickle.dumps(record), SECRET)  # a bare pickle is never loaded
    now = wire.time.time()
    monkeypatch.setattr(wire.time, "time", lambda: now + wire.MAX_AGE_S + 1)
    with pytest.raises(wire.Unsigned, match="ago"):
        wire.unseal("join", sealed, SECRET)


# -- the flags -----------------------------------------------------------------------------------------------------

def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return from_namespace(parser.parse_args(["--enable-mezo", *argv]))


def test_the_fleet_flags_come_together_and_are_checked(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    fleet = parse("--mezo-fleet-address", "10.0.0.1:30000", "--mezo-fleet-size", "3", "--mezo-fleet-rank", "2",
                  "--mezo-fleet-secret-file", str(secret)).fleet
    assert (fleet.leader_url, fleet.size, fleet.rank, fleet.leads, fleet.secret()) == \
        ("http://10.0.0.1:30000", 3, 2, False, SECRET)
    assert parse().fleet is None
    with pytest.raises(ValueError, match="--mezo-fleet-rank.*missing"):
        parse("--mezo-fleet-address", "h:1", "--mezo-fleet-size", "2", "--mezo-fleet-secret-file", str(secret))
    base = ["--mezo-fleet-address", "h:1", "--mezo-fleet-size", "2", "--mezo-fleet-secret-file", str(secret)]
    with pytest.raises(ValueError, match="--mezo-fleet-rank must be between"):
        parse(*base, "--mezo-fleet-rank", "2")
    with pytest.raises(ValueError, match="host:port"):
        parse(*base[2:], "--mezo-fleet-address", "no-port", "--mezo-fleet-rank", "0")
    short = tmp_path / "short"
    short.write_text("too short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        parse(*base[:4], "--mezo-fleet-secret-file", str(short), "--mezo-fleet-rank", "0")
    with pytest.raises(ValueError, match="secret-file"):
        parse(*base[:4], "--mezo-fleet-secret-file", str(tmp_path / "absent"), "--mezo-fleet-rank", "0")


# -- the leader ----------------------------------------------------------------------------------------------------

CHUNK = StepChunk(job_id="j", config=MezoConfig(), objective=Objective.CROSS_ENTROPY, steps=(0,), batches=((),))


def answer(request, *, failure: Failure | None = None, version: str = "v1"):
    """What one server's schedulers answer ``request`` with (one replica)."""
    if isinstance(request, MezoFleetReqInput):
        return FleetJoined(failure=failure, dp_rank=request.span.first_replica, dp_size=request.span.replicas)
    if isinstance(request, MezoChunkReqInput):
        return ChunkOutcome(failure=failure, weight_version=None if failure else version)
    if isinstance(request, MezoRestoreReqInput):
        return RestoreOutcome(failure=failure, weight_version=request.weight_version, message="replayed")
    if isinstance(request, MezoFingerprintReqInput):
        return ReplicaFingerprint(dp_rank=0, tp_rank=0, digest="d", tensors=1, weight_version=version)
    raise AssertionError(request)


class LocalSchedulers:
    """The leader's own schedulers (one replica), as its TokenizerManagerExecutor reaches them."""

    adapters: dict = {}

    def __init__(self) -> None:
        self.sent: list = []

    async def replies(self, request, expected):
        self.sent.append(request)
        return [MezoReqOutput(outcome=answer(request))]

    async def replicas(self) -> int:
        return 1

    def relabelled(self, outcome):
        return outcome

    async def run_chunk(self, chunk):
        return answer(MezoChunkReqInput(chunk=chunk))

    async def restore(self, history, weight_version):
        return answer(MezoRestoreReqInput(history=tuple(history), weight_version=weight_version))

    async def fingerprints(self):
        return (answer(MezoFingerprintReqInput()),)


class Members:
    """The other servers, as the leader's relay reaches them: each records what it was sent; ``down`` ones do not
    answer, ``failing`` ones answer with a failure."""

    def __init__(self) -> None:
        self.sent: dict[str, list] = {}
        self.down: set[str] = set()
        self.failing: set[str] = set()

    async def call(self, url, route, purpose, record):
        if url in self.down:
            raise FleetUnreachable(f"{url}: ConnectError")
        self.sent.setdefault(url, []).append(record)
        failure = Failure(FailureKind.STEP_FAILED, "it failed") if url in self.failing else None
        return [MezoReqOutput(outcome=answer(record, failure=failure))]

    async def alive(self, url):
        return url not in self.down

    def kinds(self, url) -> list[str]:
        return [type(r).__name__.removeprefix("Mezo").removesuffix("ReqInput") for r in self.sent.get(url, [])]


HISTORY = History(trajectories=(), weight_version="v0", base_weight_version="v0", base_model="m")


def leader_with(*joins: Join) -> tuple[FleetLeader, LocalSchedulers, Members]:
    local, members = LocalSchedulers(), Members()
    leader = FleetLeader(local, members, host="127.0.0.1", size=4, tp_size=1)
    leader.attach(lambda: HISTORY)
    for join in joins:
        leader.join(join)
    return leader, local, members


def join(rank: int, version: str = "v0", instance: str = "a") -> Join:
    return Join(rank, f"http://m{rank}", 1, 1, version, instance)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_member_that_serves_other_weights_is_brought_to_the_leaders_before_it_shares_a_job():
    async def go():
        leader, local, members = leader_with(join(1), join(2, version="stale"))
        await settle()  # the background re-sync of the stale one
        assert members.kinds("http://m1") == []  # already at the leader's weights
        assert members.kinds("http://m2") == ["Fleet", "Restore"]  # out of any old group, then the history
        assert leader.members[2].weight_version == "v0"
        assert await leader.replicas() == 3
        spans = [m.span for m in (local.sent[-1], members.sent["http://m1"][-1], members.sent["http://m2"][-1])]
        assert len({(s.address, s.group) for s in spans}) == 1 and spans[0].address.startswith("127.0.0.1:")
        assert [(s.first_replica, s.replicas) for s in spans] == [(0, 3), (1, 3), (2, 3)]
        assert await leader.replicas() == 3 and len(local.sent) == 1  # the same members: the same group
        outcome = await leader.run_chunk(CHUNK)  # to every member, and their answers agree
        assert outcome.failure is None and members.kinds("http://m1")[-1] == "Chunk"
        prints = await leader.fingerprints()
        assert [p.server for p in prints] == [0, 1, 2]

    asyncio.run(go())


def test_a_member_that_stops_answering_fails_the_chunk_and_is_left_out_of_the_next_group():
    async def go():
        leader, local, members = leader_with(join(1), join(2))
        assert await leader.replicas() == 3
        members.down.add("http://m2")
        outcome = await leader.run_chunk(CHUNK)
        assert outcome.failure.kind is FailureKind.STEP_FAILED and "fleet server 2" in outcome.failure.message
        assert 2 not in leader.members
        assert await leader.replicas() == 2  # re-formed without it
        assert local.sent[-1].span.replicas == 2 and local.sent[-1].span.group != local.sent[0].span.group
        members.down.clear()
        leader.join(join(2, instance="b"))  # it comes back (restarted): in the group of the next job
        await settle()
        assert await leader.replicas() == 3

    asyncio.run(go())


def test_members_that_are_down_or_cannot_join_are_dropped_before_the_rendezvous():
    async def go():
        leader, local, members = leader_with(join(1), join(2), join(3))
        members.down.add("http://m3")  # not even /health: never asked to meet the others
        members.failing.add("http://m2")  # answers, but its schedulers cannot join
        assert await leader.replicas() == 2
        assert members.kinds("http://m3") == []
        assert sorted(leader.members) == [1]
        assert [m.span.replicas for m in local.sent] == [3, 2]  # m3 never asked; the group with m2 failed, then without
        leader.members.clear()
        assert await leader.replicas() == 1  # alone again: the leader's schedulers leave the group
        assert local.sent[-1].span.address == ""

    asyncio.run(go())


def test_a_restarted_member_is_a_new_member_and_bad_joins_are_refused():
    async def go():
        leader, local, members = leader_with(join(1))
        await leader.replicas()
        leader.join(join(1))  # its heartbeat: nothing changes
        assert await leader.replicas() == 2 and len(local.sent) == 1
        leader.join(join(1, instance="restarted"))  # its schedulers are in no group now
        assert await leader.replicas() == 2 and len(local.sent) == 2
        with pytest.raises(InvalidRequest, match="ranks 1 to 3"):
            leader.join(join(4))
        with pytest.raises(InvalidRequest, match="--tp 2"):
            leader.join(dataclasses.replace(join(2), tp_size=2))

    asyncio.run(go())


def test_the_leaders_own_schedulers_failing_to_form_the_group_is_an_error():
    async def go():
        leader, local, members = leader_with(join(1))

        async def refused(request, expected):
            return [MezoReqOutput(outcome=FleetJoined(failure=Failure(FailureKind.INVALID, "no rendezvous")))]

        local.replies = refused
        with pytest.raises(Unavailable, match="no rendezvous"):
            await leader.replicas()

    asyncio.run(go())
