"""Start a real SGLang server (CPU unless CUDA is present) for a test, and stop it and all its processes after."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sglang_mezo.client import MezoClient
from sglang_mezo.launch import server_command

STARTUP_TIMEOUT_S = 240
# Ports a server binds seconds after we pick them. The kernel hands out ephemeral ports (32768+) to every outgoing
# connection meanwhile (CI lost a server to that: "address already in use" 12 s after the pick), and SGLang picks
# its own later-bound ports in 22000-29999 (`get_free_port_below_ephemeral`), so ours come from below both.
_PORTS = range(10000, 22000)
_BIND_LOST = "address already in use"
_STARTS = 3
PAPER_STEP = ("--mezo-adaptive", "none", "--mezo-estimator", "spsa", "--mezo-train", ".")
"""Flags for servers whose tests check mechanics (replay, masters, TP, failures, restarts), not the recipe: the
paper's plain step on every weight, as every server trained before the recipe became the default (the lr is each
test's own)."""


def free_port() -> int:
    """A port free now and outside the ranges the kernel and SGLang hand out to others in the meantime."""
    for port in random.sample(_PORTS, 64):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    client: MezoClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = MezoClient(self.url)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
        """Any route, through the project's own client: the status and the parsed body, whatever the status."""
        reply = self.client.request(method, path, body, timeout_s=timeout)
        return reply.status, reply.body


@contextlib.contextmanager
def running_server(model_path: str, *args: str, enable_mezo: bool = True, log_dir: Path,
                   env: dict[str, str] | None = None, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[Server]:
    for attempt in range(1, _STARTS + 1):
        server = _start(model_path, args, enable_mezo, log_dir, env)
        try:
            _wait_ready(server, startup_timeout_s)
        except _BindLost:
            _stop(server.process)
            if attempt == _STARTS:
                raise
            continue
        except BaseException:
            _stop(server.process)
            raise
        try:
            yield server
        finally:
            _stop(server.process)
        return


class _BindLost(RuntimeError):
    """Another process took the server's port between our pick and its bind: start again on another port."""


def _start(model_path: str, args: tuple[str, ...], enable_mezo: bool, log_dir: Path,
           env: dict[str, str] | None) -> Server:
    port = free_port()
    args = tuple(a.replace("{port}", str(port)) for a in args)  # an argument that names the server's own port
    cmd, server_env = server_command(["--model-path", model_path, "--port", str(port), "--host", "127.0.0.1", *args],
                                     cuda=torch.cuda.is_available(), enable_mezo=enable_mezo)
    log = log_dir / f"server-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, env={**server_env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", process, log)


def _wait_ready(server: Server, startup_timeout_s: float) -> None:
    deadline = time.monotonic() + startup_timeout_s
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if server.request("GET", "/health", timeout=5)[0] == 200:  # open whatever keys the server has
                return
        # uvicorn logs the lost bind and then waits in its shutdown instead of exiting
        if _BIND_LOST in server.log.read_text(errors="replace"):
            raise _BindLost(server.url)
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {startup_timeout_s}s:\n{server.log.read_text()[-3000:]}")
        time.sleep(1)


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
