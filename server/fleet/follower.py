"""A fleet's member: it replays the leader's history at launch, before it serves; it joins the leader once it
serves, and again every :data:`HEARTBEAT_S` (a member the leader left out comes back so); and it sends what would
change the weights, or asks about jobs, to the leader."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from .records import History, Join, Joined
from .relay import FleetUnreachable, Relay
from .role import FleetRole
from .wire import Unsigned

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
LAUNCH_WAIT_S = 600.0
"""How long a member's launch waits for the leader to answer (the leader may be starting too)."""


def leader_history(relay: Relay, leader_url: str, wait_s: float = LAUNCH_WAIT_S) -> History:
    """The leader's served history, asked for until it answers (at most ``wait_s``); a leader that refuses the
    request (another secret, another fleet) is an error at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            record = relay.call_blocking(leader_url, "/mezo/fleet/history", "history", None)
            break
        except Unsigned as exc:
            raise RuntimeError(f"the fleet's leader at {leader_url} answered in another fleet's name: {exc}") from exc
        except FleetUnreachable as exc:
            refused = exc.status is not None and 400 <= exc.status < 500  # not starting: refusing
            if refused or time.monotonic() > deadline:
                raise RuntimeError(f"the fleet's leader at {leader_url}: {exc}") from exc
            logger.info("MeZO fleet: waiting for the leader at %s (%s)", leader_url, exc)
            time.sleep(2.0)
    if not isinstance(record, History):
        raise RuntimeError(f"the fleet's leader at {leader_url} sent a {type(record).__name__}, not its history")
    return record


def own_url(host: str, port: int, leader_url: str) -> str:
    """Where the leader reaches this server: its ``--host``, or, listening on every address, the address it reaches
    the leader from."""
    if host in ("0.0.0.0", "::", ""):
        leader = urlsplit(leader_url)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((leader.hostname, leader.port or 80))  # no packet is sent: this picks the route
            host = s.getsockname()[0]
    return f"http://{host}:{port}"


def keep_joined(relay: Relay, role: FleetRole, join: Join) -> threading.Thread:
    """A thread that joins the leader once this server answers ``/health``, then every :data:`HEARTBEAT_S`."""

    def run() -> None:
        joined = False
        while True:
            try:
                if httpx.get(f"{join.url}/health", timeout=10).status_code == 200:
                    record = relay.call_blocking(role.leader_url, "/mezo/fleet/join", "join",
                                                 dataclasses.replace(join, weight_version=role.weight_version))
                    if not joined and isinstance(record, Joined):
                        logger.info("MeZO fleet: joined the leader at %s (it serves %s)", role.leader_url,
                                    record.weight_version)
                    joined = True
            except (httpx.HTTPError, FleetUnreachable, Unsigned) as exc:
                if joined or not isinstance(exc, httpx.HTTPError):
                    logger.warning("MeZO fleet: joining the leader at %s: %s", role.leader_url, exc)
                joined = False
            time.sleep(HEARTBEAT_S if joined else 1.0)

    thread = threading.Thread(target=run, name="sglang-mezo-fleet-join", daemon=True)
    thread.start()
    return thread


class FollowerGuard(BaseHTTPMiddleware):
    """On a member: requests that would change the weights answer 409 naming the leader; questions about jobs are
    redirected to it (307), whose jobs they are. Evaluation, generation and ``GET /mezo/weights`` stay here."""

    CHANGES = ("/mezo/step", "/mezo/diagnose", "/mezo/reset", "/mezo/save", "/mezo/jobs", "/v1/fine_tuning/jobs",
               "/v1/files")
    """POSTs that would train, reset or save (a diagnosis runs probe passes; files are uploaded for the leader's
    fine-tuning jobs)."""
    ASKS = ("/mezo/jobs", "/v1/fine_tuning/jobs", "/v1/files")

    def __init__(self, app, role: FleetRole) -> None:
        super().__init__(app)
        self.role = role

    async def dispatch(self, request: Request, call_next) -> Response:
        path = request.url.path
        if request.method in ("POST", "DELETE") and path.startswith(self.CHANGES):
            message = self.role.follower_refusal(f"{request.method} {path} runs")
            return JSONResponse({"object": "error", "message": message, "type": "conflict", "param": None,
                                 "code": 409, "leader": self.role.leader_url}, status_code=409)
        if request.method == "GET" and path.startswith(self.ASKS):
            query = f"?{request.url.query}" if request.url.query else ""
            return RedirectResponse(f"{self.role.leader_url}{path}{query}", status_code=307)
        return await call_next(request)


