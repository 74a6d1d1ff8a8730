"""One job at ``--dp-size 1``, at ``--dp-size 2`` and on a fleet of two servers on this machine: step time, what
the replicas exchange, user latency on each replica during the job, and whether the replicas end with the same
weights.

Each row is one ``sglang-mezo serve`` of SmolLM2-135M-Instruct (the demo's model, the server's recipe: its final
norm, FZOO with 8 probes), or two of them in a fleet (``--mezo-fleet-*`` on loopback, the member on the second
core), the same 20-step job on the same batches of movie reviews. dp 1 is the reference row, measured in the same
run. For each setup: /generate latency idle (one client per server, 12 requests) and during the job (one client
per server throughout), per replica (``meta_info.dp_rank``, or the server in a fleet); the job's median step
(``step_ms`` of its steps); the payload each replica put into the replicas' collectives per step
(``GET /mezo/weights?fingerprint=1``: bytes and collectives since launch, before and after the job); every
replica's fingerprint after the job.

On 2 cores no speed-up is expected (two replicas share the cores, and SGLang's DP controller spins one while it
waits): the rows show correctness and overhead. Run: ``make bench-fleet`` (about 50 minutes on 2 cores: dp 1 4 min,
dp 2 18 min, the fleet 28 min, measured), then
``make sim-fleet`` for the simulated fleets. Not a CI test: it measures, it does not gate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
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


def generate(client: MezoClient, server: int | None) -> tuple[int, float]:
    """One greedy /generate: the replica that answered (``server``'s own number in a fleet) and the latency in
    seconds."""
    started = time.perf_counter()
    reply = client.request("POST", "/generate", {"text": "The film was", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0}})
    if reply.status != 200:
        raise SystemExit(f"/generate failed: {reply.status} {reply.body}")
    replica = server if server is not None else int(reply.body["meta_info"].get("dp_rank") or 0)
    return replica, time.perf_counter() - started


def by_replica(samples: list[tuple[int, float]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for rank in sorted({r for r, _ in samples}):
        times = sorted(t for r, t in samples if r == rank)
        out[str(rank)] = {"n": len(times), "p50_ms": 1e3 * statistics.median(times),
                          "max_ms": 1e3 * times[-1]}
    return out


def exchanged(client: MezoClient) -> list[dict]:
    return client.weights(fingerprint=True)["fingerprints"]


SETUPS = {"dp 1": 1, "dp 2": 2, "2 servers": 1}
"""Each setup and the --dp-size of its servers."""


@contextlib.contextmanager
def servers(setup: str, secret: Path) -> Iterator[list[MezoClient]]:
    """The setup's servers (the leader first), started and ready; stopped when the block ends."""
    flags = ["--dp-size", str(SETUPS[setup])]
    if setup != "2 servers":
        with served(default_model_path(), flags, HERE.parent / f"bench-fleet-{setup.replace(' ', '')}.log") as one:
            yield [one]
        return

    def fleet(rank: int, address: str) -> list[str]:
        return [*flags, "--mezo-fleet-address", address, "--mezo-fleet-size", "2", "--mezo-fleet-rank", str(rank),
                "--mezo-fleet-secret-file", str(secret)]

    with served(default_model_path(), fleet(0, "127.0.0.1:{port}"), HERE.parent / "bench-fleet-leader.log") as leader:
        with served(default_model_path(), fleet(1, leader.url.removeprefix("http://")),
                    HERE.parent / "bench-fleet-member.log", env={"SGLANG_CPU_OMP_THREADS_BIND": "1"}) as member:
            deadline = time.monotonic() + 300
            while not leader.request("GET", "/mezo/fleet", admin=True).body.get("members"):
                if time.monotonic() > deadline:
                    raise SystemExit("the member did not join the leader")
                time.sleep(1)
            yield [leader, member]


def measure(setup: str, secret: Path) -> dict:
    with servers(setup, secret) as clients:
        leader = clients[0]
        fleet = len(clients) > 1

        def ask(i: int) -> tuple[int, float]:
            return generate(clients[i], i if fleet else None)

        idle = [ask(i) for i in range(len(clients)) for _ in range(12)]
        before = exchanged(leader)
        job = leader.submit({"examples": examples(), "steps": STEPS, "batch_size": BATCH, "seed": 0})
        during: list[tuple[int, float]] = []
        stop = threading.Event()

        def traffic(i: int) -> None:
            while not stop.is_set():
                during.append(ask(i))

        threads = [threading.Thread(target=traffic, args=(i,), daemon=True) for i in range(len(clients))]
        for thread in threads:
            thread.start()
        try:
            final = leader.wait(job["job_id"])
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        if final["status"] != "succeeded":
            raise SystemExit(f"the {setup} job did not succeed: {final.get('error')}")
        after = exchanged(leader)
        steps = leader.request("GET", f"/mezo/jobs/{job['job_id']}/history", admin=True).body["steps"]
        return {
            "setup": setup,
            "dp": SETUPS[setup],
            "servers": len(clients),
            "step_ms_median": statistics.median(s["step_ms"] for s in steps),
            "job_s": final["elapsed_s"],
            "final_loss": steps[-1]["loss"],
            "losses": [s["loss"] for s in steps],
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
    lines = ["| setup | median step | × dp 1 | replica | idle p50 | during the job p50 (max) | × idle | payload / step "
             "/ replica | collectives / step | fingerprints equal | losses: max relative difference to dp 1's |",
             "|" + "---|" * 11]
    for row in rows:
        for rank, during in row["during"].items():
            idle = row["idle"].get(rank) or next(iter(row["idle"].values()))
            i = int(rank)
            same = (f"{max(abs(a - b) / abs(b) for a, b in zip(row['losses'], ref['losses'], strict=True)):.0e}"
                    if "losses" in row and "losses" in ref else "-")
            name = row.get("setup") or f"dp {row['dp']}"  # runs before the fleet row named no setup
            lines.append(
                f"| {name} | {row['step_ms_median'] / 1e3:.2f} s | "
                f"{row['step_ms_median'] / ref['step_ms_median']:.2f} | {rank} | {idle['p50_ms']:.0f} ms | "
                f"{during['p50_ms']:.0f} ms ({during['max_ms']:.0f}) | {during['p50_ms'] / idle['p50_ms']:.2f} | "
                f"{row['payload_bytes_per_step'][i]:.0f} B | {row['collectives_per_step'][i]:.0f} | "
                f"{len(set(row['fingerprints'])) == 1} | {same} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "bench-fleet.json")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS),
                        help="which setups to run (dp 1, the reference, always runs first)")
    parser.add_argument("--table", type=Path, default=None, help="print the table of an earlier run's json, and stop")
    args = parser.parse_args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())["rows"]))
        return
    with tempfile.TemporaryDirectory() as folder:
        secret = Path(folder) / "fleet-secret"
        secret.write_text(secrets.token_hex(32))
        chosen = ["dp 1", *(setup for setup in SETUPS if setup in args.setups and setup != "dp 1")]
        rows = [measure(setup, secret) for setup in tqdm(chosen, desc="setups", unit="setup")]
    result = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 cores",
              "date": time.strftime("%Y-%m-%d"), "steps": STEPS, "batch_size": BATCH, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
