"""A small Python client for a server started with ``--enable-mezo``: submit a job, follow it with a progress bar,
evaluate, reset, save. Standard library only (plus tqdm for the bar), so it runs anywhere the server is reachable.

    client = MezoClient("http://localhost:30000", api_key=..., admin_api_key=...)  # or SGLANG_(ADMIN_)API_KEY
    job = client.train({"dataset": {...}, "steps": 200, "eval_every": 50})
    print(format_job(job))
    client.save("/models/fine-tuned")
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

FINISHED = ("succeeded", "failed", "cancelled")


class MezoError(RuntimeError):
    """The server answered with an error (``status``: the HTTP status, the message: the server's)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: its status and its body (parsed JSON, or the text when it is not JSON)."""

    status: int
    body: Any

    @property
    def message(self) -> str:
        """An error body's message (``message``, FastAPI's ``detail``, SGLang's auth ``error``), else the body."""
        if isinstance(self.body, dict):
            return str(self.body.get("message") or self.body.get("detail") or self.body.get("error") or self.body)
        return str(self.body)


API_KEY_ENV = "SGLANG_API_KEY"
"""Where the client finds the server's --api-key when none is given (sent to every route)."""
ADMIN_API_KEY_ENV = "SGLANG_ADMIN_API_KEY"
"""Where it finds the server's --admin-api-key (sent instead to the routes that train, evaluate, reset and save)."""


class MezoClient:
    """One method per /mezo route. Keys go as Bearer tokens, as SGLang checks them: the admin key (or, without one,
    the API key) to the admin routes, the API key to the others. An empty string means: no key, whatever the
    environment says."""

    def __init__(self, url: str = "http://127.0.0.1:30000", *, api_key: str | None = None,
                 admin_api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = (api_key if api_key is not None else os.environ.get(API_KEY_ENV)) or None
        self.admin_api_key = (admin_api_key if admin_api_key is not None else os.environ.get(ADMIN_API_KEY_ENV)) or None
        self.timeout_s = timeout_s

    # -- the API, one method per route -------------------------------------------------------------------------

    def submit(self, job: dict) -> dict:
        """POST /mezo/step: queue a job; returns its status (``job_id``, ``status``, ...)."""
        return self._call("POST", "/mezo/step", job, admin=True)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/mezo/jobs/{job_id}", admin=True)

    def jobs(self) -> list[dict]:
        return self._call("GET", "/mezo/jobs", admin=True)["jobs"]

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/mezo/jobs/{job_id}/cancel", {}, admin=True)

    def trajectory(self, job_id: str) -> dict:
        return self._call("GET", f"/mezo/jobs/{job_id}/trajectory", admin=True)

    def evaluate(self, examples: list[dict] | None = None, *, dataset: dict | None = None,
                 objective: str | None = None, generate: bool = False) -> dict:
        body: dict[str, Any] = {"examples": examples or [], "generate": generate}
        if dataset is not None:
            body["dataset"] = dataset
        if objective is not None:
            body["objective"] = objective
        return self._call("POST", "/mezo/eval", body, admin=True)

    def weights(self, *, fingerprint: bool = False) -> dict:
        """GET /mezo/weights; ``fingerprint``: with each replica's digest of its weights, computed now."""
        return self._call("GET", "/mezo/weights" + ("?fingerprint=1" if fingerprint else ""))

    def reset(self, job_id: str | None = None, step: int | None = None) -> dict:
        body = {k: v for k, v in (("job_id", job_id), ("step", step)) if v is not None}
        return self._call("POST", "/mezo/reset", body, admin=True)

    def save(self, path: str, *, overwrite: bool = False) -> dict:
        return self._call("POST", "/mezo/save", {"path": path, "overwrite": overwrite}, admin=True)

    # -- following a job -----------------------------------------------------------------------------------------

    def wait(self, job_id: str, *, progress: bool = True, poll_s: float = 0.5) -> dict:
        """Poll a job until it finishes, with a progress bar (steps, loss, last eval); returns its final status.
        Ctrl-C cancels the job on the server before re-raising."""
        from tqdm import tqdm

        status = self.job(job_id)
        bar = tqdm(total=status["total_steps"], desc=f"MeZO {job_id}", unit="step", disable=not progress)
        try:
            while True:
                bar.update(status["step"] - bar.n)
                bar.set_postfix(_postfix(status), refresh=False)
                if status["status"] in FINISHED:
                    return status
                time.sleep(poll_s)
                status = self.job(job_id)
        except KeyboardInterrupt:
            self.cancel(job_id)
            raise
        finally:
            bar.close()

    def train(self, job: dict, *, progress: bool = True) -> dict:
        """Submit ``job`` and follow it to its end (a ``wait`` in it is dropped: this follows the job instead)."""
        job = {k: v for k, v in job.items() if k != "wait"}
        return self.wait(self.submit(job)["job_id"], progress=progress)

    # -- transport -------------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, admin: bool = False,
                timeout_s: float | None = None) -> Reply:
        """One request to any route of the server (``/mezo/*`` or SGLang's own), JSON in and out, with the key an
        ``admin`` route (or an ordinary one) takes; any HTTP status is a :class:`Reply`. Raises OSError when the
        server cannot be reached."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        key = (self.admin_api_key or self.api_key) if admin else self.api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                status, raw = response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read().decode(errors="replace")
        try:
            return Reply(status, json.loads(raw))
        except json.JSONDecodeError:
            return Reply(status, raw)

    def _call(self, method: str, path: str, body: dict | None = None, *, admin: bool = False) -> Any:
        reply = self.request(method, path, body, admin=admin)
        if reply.status >= 400:
            raise MezoError(reply.status, reply.message)
        return reply.body


def _postfix(status: dict) -> dict[str, str]:
    out = {}
    if status.get("last"):
        out["loss"] = f"{status['last']['loss']:.4f}"
    if status.get("evals"):
        out["eval"] = _headline(status["evals"][-1])
    return out


def _headline(ev: dict) -> str:
    """An evaluation's main number: what best_eval ranks by (accuracy, else F1, else loss)."""
    if ev.get("accuracy") is not None:
        return f"acc {ev['accuracy']:.1%}"
    if ev.get("f1") is not None:
        return f"F1 {ev['f1']:.1%}"
    return f"loss {ev['loss']:.4f}"


def format_job(status: dict) -> str:
    """A job's outcome as a Markdown table: its evaluations (best marked), then the training summary."""
    lines = [f"job {status['job_id']}: {status['status']} after {status['step']}/{status['total_steps']} steps "
             f"in {status['elapsed_s']:.0f} s" + (f" ({status['error']})" if status.get("error") else "")]
    evals = status.get("evals") or []
    if evals:
        best = status.get("best_eval") or {}
        pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        lines += ["", "| step | held-out accuracy | F1 | exact match | held-out loss | weights |",
                  "|---|---|---|---|---|---|"]
        for ev in evals:
            mark = " (best)" if ev["step"] == best.get("step") else ""
            lines.append(f"| {ev['step']}{mark} | {pct(ev.get('accuracy'))} | {pct(ev.get('f1'))} | "
                         f"{pct(ev.get('exact_match'))} | {ev['loss']:.4f} | {ev['weight_version']} |")
    lines += ["", f"zero-gradient probes: {status['zero_grad_rate']:.1%}; "
                  f"|g| quantiles: {', '.join(f'{k} {v:.3g}' for k, v in status['abs_grad_quantiles'].items())}"]
    return "\n".join(lines)
