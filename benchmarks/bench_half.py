"""Is a bf16 server with fp32 masters worth it on this machine: its forward and its MeZO step against fp32's.

Two ``sglang-mezo serve`` of SmolLM2-135M-Instruct side by side, one ``--dtype float32``, one ``--dtype bfloat16
--mezo-master device``, the same batch, interleaved rep by rep:

* **forward**: 32 reviews through ``/mezo/eval`` right after ``/flush_cache`` (cold: no prefix reused);
* **step**: ``step_ms`` of a job of lr = 0 steps on 16 reviews (last 4 blocks, Rademacher), its median.

Ratios bf16 / fp32 of medians from the same run are what to read (the machine is shared and noisy). A bf16 forward
pays off on a CPU with native bf16 arithmetic (AVX512-BF16, AMX); without it PyTorch converts. Run:
``make bench-half`` (about 10 minutes on 2 cores). It measures, it does not gate.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from harness import SPSA_STEP, served

from sglang_mezo.default_model import default_model_path
from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes

MODES = {
    "fp32": ("--dtype", "float32"),
    "bf16 + fp32 master": ("--dtype", "bfloat16", "--mezo-master", "device"),
}


def cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "unknown"
    wanted = [f for f in flags.split() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2"))]
    return " ".join(sorted(set(wanted))) or "none of avx2/avx512/amx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6, help="lr = 0 steps per timed job")
    args = parser.parse_args()

    reviews, _ = balanced_split(rotten_tomatoes(), [16, 1], seed=1)  # 16 of each label
    examples = [{"prompt": f"{t} It was", "options": [" terrible", " great"], "label": y} for t, y in reviews]
    model = default_model_path()
    forward: dict[str, list[float]] = {m: [] for m in MODES}
    step: dict[str, list[float]] = {m: [] for m in MODES}
    with served(model, ("--mezo-last-layers", "4", *MODES["fp32"]), Path("bench-half-fp32.log")) as fp32, \
            served(model, ("--mezo-last-layers", "4", *MODES["bf16 + fp32 master"]), Path("bench-half-bf16.log")) \
            as bf16:
        clients = {"fp32": fp32, "bf16 + fp32 master": bf16}
        job = {"examples": examples[:16], "steps": args.steps, "batch_size": 16, "lr": 0.0, "eps": 1e-3,
               "z_kind": "rademacher", "objective": "classification", **SPSA_STEP}
        for rep in range(args.reps + 1):  # the first rep warms both up
            for mode, client in clients.items():
                if client.request("POST", "/flush_cache", admin=True).status != 200:
                    raise SystemExit("SGLang refused /flush_cache")
                began = time.perf_counter()
                client.evaluate(examples)
                seconds = time.perf_counter() - began
                done = client.train({**job, "seed": rep}, progress=False)
                if done["status"] != "succeeded":
                    raise SystemExit(f"{mode}: the job ended {done['status']}: {done}")
                history = client.request("GET", f"/mezo/jobs/{done['job_id']}/history", admin=True).body
                if rep:
                    forward[mode].append(seconds)
                    step[mode].append(statistics.median(s["step_ms"] / 1000 for s in history["steps"]))
    print(f"\n{time.strftime('%Y-%m-%d')}; {platform.machine()}, CPU flags: {cpu_flags()}; SmolLM2-135M-Instruct; "
          f"medians of {args.reps} interleaved reps\n")
    print("| mode | forward (32 reviews, cold) / fp32 | step (batch 16, last 4 blocks) / fp32 |")
    print("|---|---|---|")
    for mode in MODES:
        f = statistics.median(forward[mode]) / statistics.median(forward["fp32"])
        s = statistics.median(step[mode]) / statistics.median(step["fp32"])
        print(f"| {mode} | {f:.2f} | {s:.2f} |")


if __name__ == "__main__":
    main()
