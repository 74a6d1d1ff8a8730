"""The limits of :class:`sglang_mezo.options.Limits` that are not a number in a request: the size of a request body
(413) and open event streams (429). The others (examples, tokens, probes, steps per job, queued jobs) are checked
where the request is translated (:mod:`.translate`) and where jobs are queued (:class:`~sglang_mezo.jobs.runner.
JobRunner`)."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sglang_mezo.jobs.errors import TooLarge, TooMany
from sglang_mezo.options import Limits

from .errors import error_response

PREFIXES = ("/mezo/", "/v1/files", "/v1/fine_tuning/")
"""The paths the body limit holds: this project's routes (uploads included), not SGLang's."""


def body_limit_message(limit_bytes: int) -> str:
    return f"the request body is larger than this server takes: {limit_bytes} bytes (--mezo-max-body-mb)"


DRAIN_BYTES = 16 << 20
"""A body declared over the limit by at most this much is read and dropped before the 413: a client that sends its
whole body before reading the answer (urllib, requests) then gets the 413 and its message, not a broken pipe.
Beyond it, the 413 goes out at once and the connection closes under the sender."""


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


class BodyLimit:
    """ASGI middleware: a request to one of :data:`PREFIXES` whose body is over the limit gets a 413 that names the
    flag, before a handler sees it (a declared length), or as soon as the streamed bytes pass the limit. Other paths
    pass as they were: SGLang's own routes keep SGLang's rules. It counts the bytes as sent: SGLang's optional request
    decompression (``SGLANG_ENABLE_REQUEST_DECOMPRESSION``) runs inside it."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        root = str(scope.get("root_path", ""))
        if root and path.startswith(root):  # behind --root-path the route's own path follows it
            path = path[len(root):]
        if scope["type"] != "http" or not path.startswith(PREFIXES):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit_bytes:
            if int(declared) <= self.limit_bytes + DRAIN_BYTES:
                await _drain(receive)
            return await error_response(TooLarge(body_limit_message(self.limit_bytes)))(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit_bytes:
                    # an HTTPException passes FastAPI's body parsing as it is (any other error becomes a 400)
                    raise HTTPException(413, body_limit_message(self.limit_bytes))
            return message

        await self.app(scope, counted, send)


class StreamSlots:
    """Open event streams, at most ``Limits.max_event_streams`` at once (the event loop is one thread: a plain
    count is enough). A slot is taken when the route answers and given back when the stream ends, however it ends:
    finished, the client gone, or dropped before its first event."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def hold(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """``events``, holding a slot while they stream; :class:`TooMany` if none is free."""
        if self.open >= self.limit:
            raise TooMany(f"{self.open} event streams are open; this server allows {self.limit} "
                          f"({Limits.flag('max_event_streams')})")
        self.open += 1
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                self.open -= 1

        async def stream() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            finally:
                release()

        iterator = stream()
        weakref.finalize(iterator, release)  # a response dropped before it started iterating
        return iterator
