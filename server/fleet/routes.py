"""``/mezo/fleet/*``: what a fleet's servers ask each other (every body signed with the fleet's secret,
:mod:`.wire`), and ``GET /mezo/fleet``, the fleet as this server sees it."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sglang.srt.utils.auth import AuthLevel, auth_level

from sglang_mezo.jobs.errors import Conflict, InvalidRequest, NotFound
from sglang_mezo.protocol import ChunkOutcome, FleetJoined, ReplicaFingerprint, RestoreOutcome, SaveOutcome
from sglang_mezo.scheduler.messages import (
    MezoChunkReqInput,
    MezoFingerprintReqInput,
    MezoFleetReqInput,
    MezoRestoreReqInput,
    MezoSaveReqInput,
)

from ..context import Context, MezoContext
from ..errors import MezoRoute
from ..sglang_adapters import agreed
from .records import History, Join
from .role import FleetRole
from .wire import CONTENT_TYPE, Unsigned, seal, unseal

router = APIRouter(prefix="/mezo", tags=["mezo"], route_class=MezoRoute)

RELAYED = {MezoChunkReqInput: ChunkOutcome, MezoRestoreReqInput: RestoreOutcome, MezoSaveReqInput: SaveOutcome,
           MezoFingerprintReqInput: ReplicaFingerprint, MezoFleetReqInput: FleetJoined}
"""What the leader relays to a member's schedulers, and the outcome each answers with."""


def _role(mezo: MezoContext) -> FleetRole:
    if mezo.fleet is None:
        raise NotFound("this server is not in a fleet (--mezo-fleet-address)")
    return mezo.fleet


def _leading(mezo: MezoContext, what: str) -> FleetRole:
    """This server's role, if it leads the fleet (a member is asked ``what`` by mistake: 409 naming the leader)."""
    role = _role(mezo)
    if role.leader is None:
        raise Conflict(role.follower_refusal(what))
    return role


async def _opened(request: Request, role: FleetRole, purpose: str) -> object:
    try:
        return unseal(purpose, await request.body(), role.secret)
    except Unsigned as exc:
        raise InvalidRequest(str(exc)) from exc


def _sealed(purpose: str, record: object, role: FleetRole) -> Response:
    return Response(seal(f"{purpose}-reply", record, role.secret), media_type=CONTENT_TYPE)


@router.post("/fleet/relay", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def relay(request: Request, mezo: Context) -> Response:
    """On a member: a message from the leader for this server's schedulers; their replies."""
    role = _role(mezo)
    if role.leads:
        raise Conflict("this server leads the fleet: it relays to the others, none relays to it")
    message = await _opened(request, role, "relay")
    expected = RELAYED.get(type(message))
    if expected is None:
        raise InvalidRequest(f"the leader relays {', '.join(t.__name__ for t in RELAYED)}, not "
                             f"{type(message).__name__}")
    executor = mezo.runner.executor
    replies = await executor.replies(message, expected)
    if expected in (ChunkOutcome, RestoreOutcome):
        outcome = executor.relabelled(agreed([r.outcome for r in replies]))
        if outcome.weight_version:
            role.weight_version = outcome.weight_version
    return _sealed("relay", replies, role)


@router.post("/fleet/join", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def join(request: Request, mezo: Context) -> Response:
    """On the leader: a server asks to take part."""
    role = _leading(mezo, "join")
    record = await _opened(request, role, "join")
    if not isinstance(record, Join):
        raise InvalidRequest(f"a join carries a Join, not {type(record).__name__}")
    return _sealed("join", role.leader.join(record), role)


@router.post("/fleet/history", include_in_schema=False)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def history(request: Request, mezo: Context) -> Response:
    """On the leader: its served history, which a server replays at launch before it serves."""
    role = _leading(mezo, "ask for the history")
    await _opened(request, role, "history")
    record: History = role.leader.history()
    return _sealed("history", record, role)


@router.get("/fleet")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def fleet(mezo: Context) -> dict:
    """The fleet as this server sees it: its rank and leader; on the leader, every member, the label of the weights
    it serves and whether it shares the steps of the jobs that start now."""
    role = _role(mezo)
    out: dict = {"rank": role.rank, "size": role.size, "leader": role.leader_url}
    if role.leader is not None:
        out["group"] = role.leader.epoch
        out["members"] = [vars(state) for state in role.leader.states()]
        out["weight_version"] = role.leader.history().weight_version
    else:
        out["weight_version"] = role.weight_version
    return out
