"""Adapter jobs against full-weight jobs: base traffic's latency while each trains, and what scoring a step's probes
in one batch saves.

One ``sglang-mezo serve`` (SmolLM2-135M-Instruct on this machine's CPU) with SGLang's LoRA pool on. Part 1: eight
client threads send base traffic (``/generate`` and ``/v1/chat/completions``, plain and streaming), first for a
warm-up that is not measured, then for a fixed time with no job (the reference rows), then through an adapter job (a rank-8 LoRA on every module of every block), then
through a full-weight job (MeZO on the last block), all in one run on one server: p50 and p99 latency per phase and
their ratio to the no-job phase. Part 2, with no traffic: the same adapter steps (n probes, 2n probe adapters)
scored in one forward batch, and one forward per probe (the reference row): the median step time of each.

Run: ``make bench-adapter`` (about 15 minutes on 2 cores). Not a CI test: it measures, it does not gate.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from bench_load import Sample, for_seconds, table, under_traffic
from harness import SPSA_STEP, served

from sglang_mezo.client import MezoClient
from sglang_mezo.default_model import default_model_path
from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _examples(n: int) -> list[dict]:
    train, _ = balanced_split(rotten_tomatoes(), [n, 0], seed=0)
    return [{"prompt": f"{text[:200]} It was", "options": [" terrible", " great"], "label": y} for text, y in train]


def _median_step_ms(client: MezoClient, job_id: str) -> float:
    history = client.request("GET", f"/mezo/jobs/{job_id}/history").body
    return statistics.median(s["step_ms"] for s in history["steps"][1:])  # the first step registers the adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="steps of each job under traffic")
    parser.add_argument("--baseline-s", type=float, default=60.0, help="how long the no-job phase runs")
    parser.add_argument("--warmup-s", type=float, default=20.0,
                        help="traffic before the no-job phase, not measured (a fresh server's first requests are slow)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--probes", type=int, default=4, help="n of the batched-probes comparison (2n adapters)")
    parser.add_argument("--compare-steps", type=int, default=12)
    args = parser.parse_args()

    slots = 2 * args.probes + 2
    examples = _examples(32)
    job = {"examples": examples, "steps": args.steps, "batch_size": args.batch_size, "n_probes": 2, **SPSA_STEP}
    with served(default_model_path(), ["--mezo-last-layers", "1", "--enable-lora", "--lora-backend",
                                       "torch_native", "--max-lora-rank", "8", "--lora-target-modules", *MODULES,
                                       "--max-loras-per-batch", str(slots)],
                Path("bench-adapter-server.log")) as client:
        base = client.url
        phases: dict[str, list[Sample]] = {"no job": [], "adapter job": [], "full-weight job": []}
        under_traffic(base, args.clients, [], lambda: for_seconds(args.warmup_s, "warm-up"))
        under_traffic(base, args.clients, phases["no job"], lambda: for_seconds(args.baseline_s, "no job"))
        adapter_job = under_traffic(base, args.clients, phases["adapter job"], lambda: client.train(
            {**job, "lr": 2e-2, "eps": 1e-2, "adapter": {"name": "bench-tenant", "rank": 8}}))
        full_job = under_traffic(base, args.clients, phases["full-weight job"], lambda: client.train(
            {**job, "lr": 1e-4, "eps": 1e-3}))
        compared = {}
        for together in (False, True):
            done = client.train({**job, "steps": args.compare_steps, "n_probes": args.probes, "lr": 2e-2,
                                 "eps": 1e-2, "adapter": {"name": f"compare-{together}", "rank": 8,
                                                          "probes_in_one_batch": together}})
            compared[together] = (done, _median_step_ms(client, done["job_id"]))

    print(f"\nMachine: {os.cpu_count()}-core {platform.machine()} CPU, {platform.system()}; "
          f"{time.strftime('%Y-%m-%d')}; SmolLM2-135M-Instruct fp32 via sglang-mezo serve --enable-lora "
          f"(torch_native, {slots} slots); {args.clients} clients")
    for name, done in (("adapter", adapter_job), ("full-weight", full_job)):
        print(f"{name} job: {done['status']}, {done['step']} steps (batch {args.batch_size}, n = 2), "
              f"{done['elapsed_s']:.0f} s, longest step {done['longest_step_ms']:.0f} ms")
    print(table(phases))
    alone, together = compared[False][1], compared[True][1]
    print(f"\n| adapter step, n = {args.probes} ({2 * args.probes} probe adapters), batch {args.batch_size} | "
          "median step (ms) | ratio |\n|---|---|---|")
    print(f"| one forward per probe (reference) | {alone:.0f} | 1.00 |")
    print(f"| all probes in one forward batch | {together:.0f} | {together / alone:.2f} |")
    errors = [s.error for p in phases.values() for s in p if s.error]
    if errors:
        print(f"errors ({len(errors)}), first: {errors[0]}")


if __name__ == "__main__":
    main()
