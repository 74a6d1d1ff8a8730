"""HTTP between a fleet's servers: a signed record out, a signed record back (:mod:`.wire`)."""

from __future__ import annotations

import httpx

from sglang_mezo.jobs.errors import Unavailable

from .wire import CONTENT_TYPE, seal, unseal

RELAY_TIMEOUT_S = 900.0
"""How long the leader waits for a member's answer: longer than the group's own timeout (300 s), so that a member
whose peer died answers with the failed step instead of being given up on first."""


class FleetUnreachable(Unavailable):
    """A server of the fleet did not answer, or answered with an error (``status``: its HTTP status, if it
    answered)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _headers(bearer: str | None) -> dict[str, str]:
    headers = {"Content-Type": CONTENT_TYPE}
    if bearer:  # the fleet's servers share SGLang's keys, if they use them (docs/fleet.md)
        headers["Authorization"] = f"Bearer {bearer}"
    return headers


def _answer(url: str, response: httpx.Response, purpose: str, secret: bytes) -> object:
    if response.status_code != 200:
        raise FleetUnreachable(f"{url} answered {response.status_code}: {response.text[:300]}", response.status_code)
    return unseal(f"{purpose}-reply", response.content, secret)


class Relay:
    """The leader's (or a joiner's) client for the other servers' ``/mezo/fleet/*`` routes."""

    def __init__(self, secret: bytes, bearer: str | None = None, timeout_s: float = RELAY_TIMEOUT_S) -> None:
        self.secret = secret
        self.bearer = bearer
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # made on the event loop that uses it
            self._client = httpx.AsyncClient(timeout=self.timeout)
        return self._client

    async def call(self, base_url: str, route: str, purpose: str, record: object) -> object:
        """POST ``record`` signed for ``purpose`` to ``base_url + route``; the signed answer's record."""
        url = base_url + route
        try:
            response = await self.client.post(url, content=seal(purpose, record, self.secret),
                                              headers=_headers(self.bearer))
        except httpx.HTTPError as exc:
            raise FleetUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
        return _answer(url, response, purpose, self.secret)

    async def alive(self, base_url: str, timeout_s: float = 10.0) -> bool:
        """Whether the server at ``base_url`` answers ``/health`` now."""
        try:
            return (await self.client.get(base_url + "/health", timeout=timeout_s)).status_code == 200
        except httpx.HTTPError:
            return False

    def call_blocking(self, base_url: str, route: str, purpose: str, record: object, timeout_s: float = 30.0) -> object:
        """:meth:`call` from a thread with no event loop (the launch, the join thread)."""
        url = base_url + route
        try:
            response = httpx.post(url, content=seal(purpose, record, self.secret), headers=_headers(self.bearer),
                                  timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise FleetUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
        return _answer(url, response, purpose, self.secret)
