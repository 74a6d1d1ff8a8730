"""What the benchmarks share: a ``sglang-mezo serve`` on this machine for the length of a ``with`` block."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from sglang_mezo.client import MezoClient


SPSA_STEP = {"estimator": "spsa", "schedule": "constant"}
"""The step the cost and traffic benchmarks time (MeZO's two-sided probes, a constant lr), named so that their jobs
do not move with the server's recipe (FZOO with 8 probes since 2026-12-05) and stay comparable with their earlier
rows."""


@contextlib.contextmanager
def served(model_path: Path, flags: Sequence[str], log: Path, start_timeout_s: float = 900,
           env: dict[str, str] | None = None) -> Iterator[MezoClient]:
    """A server on a free loopback port with ``flags`` (its output in ``log``; ``{port}`` in a flag is the server's
    own port) and ``env`` added to this process's environment, and a client for it; stopped, with its whole process
    group, when the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [flag.replace("{port}", str(port)) for flag in flags]
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "sglang_mezo.cli", "serve", "--port", str(port), "--host",
                                   "127.0.0.1", "--model-path", str(model_path), *flags],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, **(env or {})})
    try:
        client = MezoClient(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + start_timeout_s
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {log}")
            try:
                client.weights()
                break
            except OSError:
                time.sleep(1)
        yield client
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)
