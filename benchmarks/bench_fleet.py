"""One job at ``--dp-size 1`` and ``--dp-size 2`` on this machine: step time, what the replicas exchange, user
latency on each replica during the job, and whether the replicas end with the same weights.

Each row is one ``sglang-mezo serve`` of SmolLM2-135M-Instruct (the demo's model, the server's recipe: its final
norm, FZOO with 8 probes), the same 20-step job on the same batches of movie reviews. dp 1 is the reference row,
measured in the same run. For each server: /generate latency idle (one client, 12 requests) and during the job
(one client throughout), per replica (``meta_info.dp_rank``); the job's median step (``step_ms`` of its steps); the
payload each replica put into the replicas' collectives per step (``GET /mezo/weights?fingerprint=1``: bytes and
collectives since launch, before and after the job); every replica's fingerprint after the job.

On 2 cores no speed-up is expected (two replicas share the cores, and SGLang's DP controller spins one while it
waits): the rows show correctness and overhead. Run: ``make bench-fleet`` (about 20 minutes on 2 cores), then
``make sim-fleet`` for the simulated fleets. Not a CI test: it measures, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

from harness import served
from tqdm import tqdm

from sglang_mezo.client import MezoClient
from sglang_mezo.default_model import default_model_path
from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes

HERE = Path(__file__).parent
PROMPT = "Review: {text}\nSentiment:"
STEPS = 20
BATCH = 16


def examples() -> list[dict]:
    train, _ = balanced_split(rotten_tomatoes(), [32, 0], seed=0)
    return [{"prompt": PROMPT.format(text=t), "options": [" negative", " positive"], "label": y} for t, y in train]


def generate(client: MezoClient) -> tuple[int, float]:
    """One greedy /generate: the replica that answered and the latency in seconds."""
    started = time.perf_counter()
    reply = client.request("POST", "/generate", {"text": "The film was", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0}})
    if reply.status != 200:
        raise SystemExit(f"/generate failed: {reply.status} {reply.body}")
    return int(reply.body["meta_info"].get("dp_rank") or 0), time.perf_counter() - started


def by_replica(samples: list[tuple[int, float]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for rank in sorted({r for r, _ in samples}):
        times = sorted(t for r, t in samples if r == rank)
        out[str(rank)] = {"n": len(times), "p50_ms": 1e3 * statistics.median(times),
                          "max_ms": 1e3 * times[-1]}
    return out


def exchanged(client: MezoClient) -> list[dict]:
    return client.weights(fingerprint=True)["fingerprints"]


def measure(dp: int, log: Path) -> dict:
    with served(default_model_path(), ["--dp-size", str(dp)], log) as client:
        idle = [generate(client) for _ in range(12)]
        before = exchanged(client)
        job = client.submit({"examples": examples(), "steps": STEPS, "batch_size": BATCH, "seed": 0})
        during: list[tuple[int, float]] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                during.append(generate(client))

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            final = client.wait(job["job_id"])
        finally:
            stop.set()
            thread.join()
        if final["status"] != "succeeded":
            raise SystemExit(f"the dp {dp} job did not succeed: {final.get('error')}")
        after = exchanged(client)
        steps = client.request("GET", f"/mezo/jobs/{job['job_id']}/history", admin=True).body["steps"]
        return {
            "dp": dp,
            "step_ms_median": statistics.median(s["step_ms"] for s in steps),
            "job_s": final["elapsed_s"],
            "final_loss": steps[-1]["loss"],
            "idle": by_replica(idle),
            "during": by_replica(during),
            "payload_bytes_per_step": [(a["exchanged_bytes"] - b["exchanged_bytes"]) / STEPS
                                       for a, b in zip(after, before, strict=True)],
            "collectives_per_step": [(a["exchanges"] - b["exchanges"]) / STEPS
                                     for a, b in zip(after, before, strict=True)],
            "fingerprints": [a["digest"] for a in after],
            "n_probes": final["recipe"]["n_probes"],
        }


def table(rows: list[dict]) -> str:
    ref = rows[0]
    lines = ["| dp | median step | × dp 1 | replica | idle p50 | during the job p50 (max) | × idle | payload / step "
             "/ replica | collectives / step | fingerprints equal |", "|" + "---|" * 10]
    for row in rows:
        for rank, during in row["during"].items():
            idle = row["idle"].get(rank) or next(iter(row["idle"].values()))
            i = int(rank)
            lines.append(
                f"| {row['dp']} | {row['step_ms_median'] / 1e3:.2f} s | {row['step_ms_median'] / ref['step_ms_median']:.2f} "
                f"| {rank} | {idle['p50_ms']:.0f} ms | {during['p50_ms']:.0f} ms ({during['max_ms']:.0f}) | "
                f"{during['p50_ms'] / idle['p50_ms']:.2f} | {row['payload_bytes_per_step'][i]:.0f} B | "
                f"{row['collectives_per_step'][i]:.0f} | {len(set(row['fingerprints'])) == 1} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "bench-fleet.json")
    args = parser.parse_args()
    rows = [measure(dp, HERE.parent / f"bench-fleet-dp{dp}.log") for dp in tqdm((1, 2), desc="servers", unit="server")]
    result = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 cores",
              "date": time.strftime("%Y-%m-%d"), "steps": STEPS, "batch_size": BATCH, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
