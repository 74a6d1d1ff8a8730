"""User traffic while the served model trains: latency with and without a job, errors, and which weights served
each token.

One ``sglang-mezo serve`` (SmolLM2-135M-Instruct on this machine's CPU, MeZO on its last block). Eight client
threads send, in turn, ``/generate`` and ``/v1/chat/completions``, each plain and streaming, first for a fixed time
with no job (the reference rows, same run), then for the whole of a 200-step job. Reported per phase and kind:
requests, errors, p50 and p99 latency (time to the last byte), and their ratio to the no-job phase.

Every ``/generate`` answer (plain, and each streamed event) carries SGLang's weight-version spans; each must name
the base or a step the job committed (``mezo-JOB-k`` with k at most the job's last step), and the spans of one
answer must never go back in k. Chat answers carry one version (their ``metadata``); it is checked the same way.

Run: ``make bench-load`` (about 15 minutes on 2 cores). Not a CI test: it measures, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from harness import SPSA_STEP, served
from tqdm import tqdm

from sglang_mezo.default_model import default_model_path
from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes

KINDS = ("generate", "generate-stream", "chat", "chat-stream")
PROMPTS = ["Write one sentence about the sea.", "Name three colours.", "What is a movie review?",
           "Say hello in French.", "Describe a cat in five words.", "What is two plus two?"]


@dataclass
class Sample:
    kind: str
    latency_s: float
    error: str | None
    versions: list[str] = field(default_factory=list)


def _post(url: str, body: dict, stream: bool) -> tuple[list[dict], float]:
    """The answer's JSON objects (each streamed event, or the one body) and the time to the last byte."""
    started = time.perf_counter()
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        if not stream:
            return [json.loads(response.read())], time.perf_counter() - started
        events = []
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data:").strip()))
    return events, time.perf_counter() - started


def one_request(base: str, kind: str, prompt: str) -> Sample:
    stream = kind.endswith("stream")
    try:
        if kind.startswith("generate"):
            events, latency = _post(f"{base}/generate", {"text": prompt, "stream": stream, "sampling_params": {
                "max_new_tokens": 16, "temperature": 0}}, stream)
            versions = [span["version"] for e in events for span in e["meta_info"].get("weight_versions") or []]
        else:
            events, latency = _post(f"{base}/v1/chat/completions", {
                "model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                "temperature": 0, "stream": stream}, stream)
            versions = [str(v) for e in events for v in _chat_versions(e)]
        return Sample(kind, latency, None, versions)
    except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
        return Sample(kind, 0.0, f"{type(exc).__name__}: {exc}")


def _chat_versions(event: dict) -> list[str]:
    metadata = event.get("metadata") or {}
    found = metadata.get("weight_version") or metadata.get("weight_versions") or []
    return [found] if isinstance(found, str) else [s["version"] if isinstance(s, dict) else s for s in found]


def clients(base: str, n: int, stop: threading.Event, out: list[Sample]) -> list[threading.Thread]:
    def loop(i: int) -> None:
        k = i
        while not stop.is_set():
            out.append(one_request(base, KINDS[k % len(KINDS)], PROMPTS[k % len(PROMPTS)]))
            k += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def under_traffic(base: str, n_clients: int, samples: list[Sample], run):
    """``run()``'s result, with ``n_clients`` client threads sending traffic into ``samples`` meanwhile."""
    stop = threading.Event()
    threads = clients(base, n_clients, stop, samples)
    try:
        return run()
    finally:
        stop.set()
        for t in threads:
            t.join()


def for_seconds(seconds: float, desc: str) -> None:
    """Wait ``seconds``, with a progress bar."""
    for _ in tqdm(range(int(seconds)), desc=desc, unit="s"):
        time.sleep(1)


def check_versions(samples: list[Sample], job_id: str, last_step: int, base_version: str) -> int:
    """Answers whose versions name no committed step, or go back: must be 0."""
    pattern = re.compile(rf"mezo-{re.escape(job_id)}-(\d+)$")
    bad = 0
    for sample in samples:
        steps = []
        for version in sample.versions:
            match = pattern.match(version)
            if version == base_version:
                steps.append(0)
            elif match and int(match.group(1)) <= last_step:
                steps.append(int(match.group(1)))
            else:
                bad += 1
                break
        else:
            bad += steps != sorted(steps)
    return bad


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def table(phases: dict[str, list[Sample]]) -> str:
    rows = ["| phase | kind | requests | errors | p50 latency (s) | p99 latency (s) | p50 / no job | p99 / no job |",
            "|---|---|---|---|---|---|---|---|"]
    reference = {}
    for phase, samples in phases.items():
        for kind in (*KINDS, "all"):
            chosen = [s for s in samples if kind in ("all", s.kind)]
            ok = [s.latency_s for s in chosen if s.error is None]
            if not ok:
                continue
            p50, p99 = quantile(ok, 0.5), quantile(ok, 0.99)
            reference.setdefault(kind, (p50, p99))
            ratio = reference[kind]
            rows.append(f"| {phase} | {kind} | {len(chosen)} | {len(chosen) - len(ok)} | {p50:.3f} | {p99:.3f} | "
                        f"{p50 / ratio[0]:.2f} | {p99 / ratio[1]:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--baseline-s", type=float, default=90.0, help="how long the no-job phase runs")
    parser.add_argument("--last-layers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    with served(default_model_path(), ["--mezo-last-layers", str(args.last_layers)],
                Path("bench-load-server.log")) as client:
        base = client.url
        base_version = client.weights()["weight_version"]
        phases: dict[str, list[Sample]] = {"no job": [], f"{args.steps}-step job": []}

        under_traffic(base, args.clients, phases["no job"], lambda: for_seconds(args.baseline_s, "no job"))

        train, _ = balanced_split(rotten_tomatoes(), [32, 0], seed=0)
        examples = [{"prompt": f"{text[:200]} It was", "options": [" terrible", " great"], "label": y}
                    for text, y in train]
        job = under_traffic(base, args.clients, phases[f"{args.steps}-step job"], lambda: client.train(
            {"examples": examples, "steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4, "eps": 1e-3,
             **SPSA_STEP}))

    trained = phases[f"{args.steps}-step job"]
    bad = check_versions(trained, job["job_id"], job["step"], base_version)
    print(f"\nMachine: {os.cpu_count()}-core {platform.machine()} CPU, {platform.system()}; "
          f"{time.strftime('%Y-%m-%d')}; SmolLM2-135M-Instruct fp32 via sglang-mezo serve; {args.clients} clients; "
          f"job: {job['status']}, "
          f"{job['step']} steps (last {args.last_layers} block(s), batch {args.batch_size}), "
          f"{job['elapsed_s']:.0f} s, longest step {job['longest_step_ms']:.0f} ms")
    print(table(phases))
    checked = sum(1 for s in trained if s.error is None and s.versions)
    print(f"\nweight versions: {checked} answers during the job carried versions; {bad} named no committed step "
          "or went back")
    errors = [s.error for p in phases.values() for s in p if s.error]
    if errors:
        print(f"errors ({len(errors)}), first: {errors[0]}")


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
