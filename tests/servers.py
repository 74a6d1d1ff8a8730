"""Start a real SGLang server (CPU unless CUDA is present) for a test, and stop it and all its processes after."""

from __future__ import annotations

import contextlib
import os
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = free_port()
    cmd, server_env = server_command(["--model-path", model_path, "--port", str(port), "--host", "127.0.0.1", *args],
                                     cuda=torch.cuda.is_available(), enable_mezo=enable_mezo)
    env = {**server_env, **(env or {})}
    log = log_dir / f"server-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if server.request("GET", "/health", timeout=5)[0] == 200:  # open whatever keys the server has
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {startup_timeout_s}s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
