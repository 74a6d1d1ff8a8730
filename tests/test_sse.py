"""The polled Server-Sent Events loop both event streams share (``sglang_mezo.server.sse``)."""

from __future__ import annotations

import asyncio

import pytest

from sglang_mezo.server import sse


def collect(poll: sse.Poll, poll_s: float = 0.01) -> list[str]:
    async def run() -> list[str]:
        return [m async for m in sse.polled(poll, poll_s)]

    return asyncio.run(asyncio.wait_for(run(), timeout=10))


def test_messages_in_order_and_the_last_poll_sent_before_the_end() -> None:
    polls = iter([(["a"], False), ([], False), (["b", "c"], False), (["d"], True), (["never"], False)])
    assert collect(lambda: next(polls)) == ["a", "b", "c", "d"]


def test_a_quiet_stream_pings_and_a_message_restarts_the_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "PING_S", 0.03)  # 3 polls of 0.01 s
    polls = iter([([], False)] * 4 + [(["x"], False)] + [([], False)] * 2 + [([], True)])
    out = collect(lambda: next(polls))
    # pings after 3 quiet polls, none in the 2 quiet polls after "x"
    assert out == [": ping\n\n", "x"]
