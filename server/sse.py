"""Server-Sent Events from polling: what both event streams (``/mezo/jobs/{id}/events`` and
``/v1/fine_tuning/jobs/{id}/events?stream=true``) share. A job's state lives on the event loop, so a stream polls it
rather than being pushed to: the poll is cheap and no job has to know who is listening."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

PING_S = 15.0
"""A comment line this often when nothing is sent: keeps proxies open, and a gone client ends the stream."""

Poll = Callable[[], tuple[Sequence[str], bool]]
"""What a stream sends now (whole SSE messages), and whether it ends after them."""


async def polled(poll: Poll, poll_s: float) -> AsyncIterator[str]:
    """Each poll's messages as they come, every ``poll_s`` seconds, a ping after :data:`PING_S` of quiet, until a
    poll says the stream is done (its messages are sent first)."""
    quiet = 0.0
    while True:
        messages, done = poll()
        if messages:
            quiet = 0.0
        for message in messages:
            yield message
        if done:
            return
        if quiet >= PING_S:
            quiet = 0.0
            yield ": ping\n\n"
        await asyncio.sleep(poll_s)
        quiet += poll_s
