"""What one MeZO step costs, against what its forwards cost and against the plain PyTorch loop, side by side.

One run, one model (SmolLM2-135M-Instruct, fp32), one fixed batch: 16 short Rotten Tomatoes snippets as
"<text> It was" -> " terrible" / " great" (one token each), the classification objective. For each trainable set
(the last 4 blocks; all parameters) and each kind of z (Rademacher; Gaussian), in the same process and interleaved
rep by rep so that the machine's drift hits every row alike:

* **paper**: the reference, Algorithm 1 written plainly in PyTorch on transformers (``reference_mezo.py``);
* **core (transformers)**: our step (``mezo_step``) on the transformers engine, same model and batch;
* **fwd (transformers)**: one forward of the batch as our step scores it (what a step needs twice);
* **z pass** and **copy**: one ``zaxpy_`` pass over the trainable tensors with one seed, and with two (the probe
  move), against ``copy_`` of the same tensors into a second buffer (what memory speed allows);

then, in a live server (``sglang-mezo serve``, one per trainable set, the job's z kind per job):

* **server step**: ``step_ms`` of a job's steps on the same batch with lr = 0 (the weights stay put), medians;
* **server fwd**: the same batch through ``/mezo/eval`` right after SGLang's ``/flush_cache`` (cold: no prefix).

And the drift question: a 200-step job at the demo's settings, median step time of the first 10 against the last 10.

Ratios are what to read (this machine is shared and noisy): every ratio is of two numbers from the same run.
Run: ``make bench-step`` (about 25 minutes on 2 cores). Not a CI test: it measures, it does not gate.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from harness import SPSA_STEP, served  # noqa: E402
from reference_mezo import ChoiceBatch, choice_loss, paper_step  # noqa: E402

from sglang_mezo.client import MezoClient  # noqa: E402
from sglang_mezo.core.objectives import ChoiceExample, Objective, batch_loss_fn  # noqa: E402
from sglang_mezo.core.params import ParamSelection, TrainableSet  # noqa: E402
from sglang_mezo.core.spsa import mezo_step  # noqa: E402
from sglang_mezo.default_model import default_model_path  # noqa: E402
from sglang_mezo.engines.hf import HFEngine  # noqa: E402
from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes  # noqa: E402
from sglang_mezo.kernels import ZKind, zaxpy_  # noqa: E402

TEMPLATE = "{text} It was"
OPTIONS = [" terrible", " great"]
SELECTIONS = {"last 4 blocks": 4, "all": None}


@dataclass
class Row:
    """Medians (seconds) of one (trainable set, z kind) configuration."""

    trainable: str
    kind: ZKind
    numel: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, what: str, seconds: float) -> None:
        self.times.setdefault(what, []).append(seconds)

    def median(self, what: str) -> float:
        return statistics.median(self.times[what]) if self.times.get(what) else float("nan")


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def snippets(n: int, words: int, seed: int) -> list[tuple[str, int]]:
    """``n`` balanced reviews, each cut to its first ``words`` words: short, as a step's batch usually is."""
    (chosen,) = balanced_split(rotten_tomatoes(), [n // 2], seed=seed)
    return [(" ".join(text.split()[:words]), label) for text, label in chosen]


# -- transformers side -------------------------------------------------------------------------------------------


def measure_transformers(model_path: Path, reviews: list[tuple[str, int]], rows: list[Row], reps: int,
                         eps: float) -> None:
    tok = AutoTokenizer.from_pretrained(model_path)
    option_ids = tuple(tok(o, add_special_tokens=False)["input_ids"][0] for o in OPTIONS)
    prompts = tuple(tuple(tok(TEMPLATE.format(text=t))["input_ids"]) for t, _ in reviews)
    labels = tuple(label for _, label in reviews)
    plain = ChoiceBatch(prompts, option_ids, labels)
    examples = [ChoiceExample(p, tuple((o,) for o in option_ids), y) for p, y in zip(prompts, labels, strict=True)]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval().requires_grad_(False)
    engine = HFEngine(model)
    loss = batch_loss_fn(engine, Objective.CLASSIFICATION, examples)
    prepared = []
    for row in rows:
        selection = ParamSelection(last_layers=SELECTIONS[row.trainable])
        params = TrainableSet.from_pieces(engine.trainable_pieces(), selection, engine.num_layers)
        row.numel = params.numel
        tensors = [t.theta for t in params.targets]
        copies = [t.clone() for t in tensors]  # written once: no first-touch page faults inside the timed copy
        prepared.append((row, params, tensors, copies))
    steps = 0
    with tqdm(total=reps * len(rows), desc="transformers rows", unit="rep") as bar:
        for _ in range(reps):
            for row, params, tensors, copies in prepared:
                steps += 1
                row.add("paper", timed(lambda: paper_step(model, tensors, plain, seed=steps, eps=eps, lr=0.0,
                                                          kind=row.kind)))
                row.add("core", timed(lambda: mezo_step(params, loss, [steps], eps=eps, lr=0.0, kind=row.kind)))
                row.add("fwd", timed(loss))
                row.add("paper fwd", timed(lambda: choice_loss(model, plain)))
                row.add("copy", timed(lambda: [c.copy_(t) for c, t in zip(copies, tensors, strict=True)]))
                row.add("z pass", timed(lambda: zaxpy_(params.targets, [steps], [eps], kind=row.kind)))
                row.add("z pass 2", timed(lambda: zaxpy_(params.targets, [steps, steps + 1], [-eps, eps],
                                                         kind=row.kind)))
                zaxpy_(params.targets, [steps + 1], [-eps], kind=row.kind)  # back (to within fp32 rounding)
                bar.update()


# -- server side -------------------------------------------------------------------------------------------------


def job_step_seconds(client: MezoClient, job: dict) -> list[float]:
    done = client.wait(client.submit(job)["job_id"], progress=False)
    if done["status"] != "succeeded":
        raise SystemExit(f"a benchmark job ended {done['status']}: {done}")
    history = client.request("GET", f"/mezo/jobs/{done['job_id']}/history", admin=True).body
    return [s["step_ms"] / 1000 for s in history["steps"]]


def cold_eval_seconds(client: MezoClient, examples: list[dict]) -> float:
    if client.request("POST", "/flush_cache", admin=True).status != 200:
        raise SystemExit("SGLang refused /flush_cache")
    return timed(lambda: client.evaluate(examples))


@dataclass(frozen=True)
class Drift:
    """Whether a step gets slower as a job goes on, and whose fault it would be: a long job's step times, the cold
    forward before and after it (the machine, or the server, slowing down), and a short job right after it (state
    kept per job would start afresh there)."""

    steps: list[float]
    forward_before: float
    forward_after: float
    next_job: list[float]

    def report(self) -> str:
        first, last = statistics.median(self.steps[:10]), statistics.median(self.steps[-10:])
        again = statistics.median(self.next_job[:10])
        return (f"drift: a {len(self.steps)}-step job (last 4 blocks, rademacher, lr 1e-4, the batch above): median "
                f"step of the first 10 {first:.3f} s, of the last 10 {last:.3f} s: **ratio {last / first:.3f}**; "
                f"the next job's first 10: {again:.3f} s ({again / first:.3f}); cold forward before "
                f"{self.forward_before:.3f} s, after {self.forward_after:.3f} s "
                f"({self.forward_after / self.forward_before:.3f})")


def measure_drift(client: MezoClient, examples: list[dict], eps: float, steps: int) -> Drift:
    job = {"examples": examples, "batch_size": len(examples), "lr": 1e-4, "eps": eps, "z_kind": "rademacher",
           **SPSA_STEP}
    before = statistics.median(cold_eval_seconds(client, examples) for _ in range(3))
    long_job = job_step_seconds(client, {**job, "steps": steps, "seed": 99})
    after = statistics.median(cold_eval_seconds(client, examples) for _ in range(3))
    next_job = job_step_seconds(client, {**job, "steps": 10, "seed": 100})
    return Drift(long_job, before, after, next_job)


def measure_server(model_path: Path, reviews: list[tuple[str, int]], rows: list[Row], steps: int, reps: int,
                   eps: float, drift_steps: int) -> Drift | None:
    examples = [{"prompt": TEMPLATE.format(text=t), "options": OPTIONS, "label": y} for t, y in reviews]
    drift = None
    for trainable, last_layers in SELECTIONS.items():
        extra = [] if last_layers is None else ["--mezo-last-layers", str(last_layers)]
        with served(model_path, extra, Path(f"bench-step-server-{last_layers or 'all'}.log")) as client:
            mine = [r for r in rows if r.trainable == trainable]
            for row in tqdm(mine, desc=f"server ({trainable})", unit="config"):
                for rep in range(reps):
                    job = {"examples": examples, "steps": steps + 1, "batch_size": len(examples), "lr": 0.0,
                           "eps": eps, "z_kind": row.kind.value, "seed": rep, **SPSA_STEP}
                    for seconds in job_step_seconds(client, job)[1:]:  # the first step warms up
                        row.add("server", seconds)
                    row.add("server fwd", cold_eval_seconds(client, examples))
            if last_layers == 4 and drift_steps:
                drift = measure_drift(client, examples, eps, drift_steps)
    return drift


# -- report ------------------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [
        "| trainable | z | paper step | server step / paper | core (transformers) / paper | "
        "server step / 2 × server fwd | core / 2 × fwd (transformers) | z pass / copy | 2-seed pass / copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = r.median("paper")
        lines.append(
            f"| {r.trainable} ({r.numel / 1e6:.1f} M) | {r.kind.value} | {paper:.2f} s | "
            f"{r.median('server') / paper:.2f} | {r.median('core') / paper:.2f} | "
            f"{r.median('server') / (2 * r.median('server fwd')):.2f} | "
            f"{r.median('core') / (2 * r.median('fwd')):.2f} | "
            f"{r.median('z pass') / r.median('copy'):.1f} | {r.median('z pass 2') / r.median('copy'):.1f} |")
    return "\n".join(lines)


def absolute(rows: list[Row]) -> str:
    keys = ["paper", "core", "server", "fwd", "paper fwd", "server fwd", "z pass", "z pass 2", "copy"]
    lines = ["| trainable | z | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r.trainable} | {r.kind.value} | " + " | ".join(f"{r.median(k):.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="transformers repetitions per configuration")
    parser.add_argument("--server-steps", type=int, default=6, help="timed steps per server job (after 1 warm-up)")
    parser.add_argument("--server-reps", type=int, default=2, help="server jobs per configuration")
    parser.add_argument("--drift-steps", type=int, default=200, help="0: skip the drift job")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()

    model_path = default_model_path()
    reviews = snippets(16, words=24, seed=0)
    rows = [Row(trainable, kind) for trainable in SELECTIONS for kind in (ZKind.RADEMACHER, ZKind.GAUSSIAN)]
    measure_transformers(model_path, reviews, rows, args.reps, args.eps)
    drift = None if args.skip_server else measure_server(
        model_path, reviews, rows, args.server_steps, args.server_reps, args.eps, args.drift_steps)

    print(f"\n{time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M-Instruct fp32; batch of "
          f"{len(reviews)} snippets, 2 one-token options; medians of {args.reps} (transformers) and "
          f"{args.server_reps}x{args.server_steps} (server) steps, lr = 0\n")
    print(table(rows))
    print("\nmedian seconds (this run only)\n")
    print(absolute(rows))
    if drift is not None:
        print("\n" + drift.report())

if __name__ == "__main__":
    main()
