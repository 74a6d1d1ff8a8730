"""Which step rule learns the final norm's gain fastest? MeZO's own step, run exactly, on cached features.

With SmolLM2's tied head the option logits at the last prompt position are ``(g ⊙ n(h)) · E_option``: ``n(h)`` the
last hidden state normalised by the final RMSNorm (before its gain ``g``), ``E`` the option tokens' embedding rows.
The classification loss (a softmax over the two options) depends on ``g`` only through the gap
``(n(h) ⊙ (E_great - E_terrible)) · g``: a logistic regression in the 576 numbers of ``g``, over features that do not
depend on ``g``. So one forward per review (cached in ``benchmarks/.cache``) makes a final-norm job's whole run
computable in seconds, with the core's own step (:func:`~sglang_mezo.core.run.run_step`: its seeds, z stream,
estimators, step-size rule and schedule) and the server's batch order (:func:`~sglang_mezo.jobs.spec.step_batches`).
What it leaves out is the server's arithmetic of the forward itself (fp32 logits through SGLang's kernels, not these
float64 dot products): its curves match a server run's in distribution, not bit for bit.

It answers the question ``bench-learning`` cannot afford to ask on this machine (an hour per row at 64,000
example-forwards): which lr, schedule, ε, batch and estimator to make the recipe. Settings are chosen on a
**validation** split (1,000 reviews disjoint from the training set and from ``bench-learning``'s held-out set) and
then reported on the held-out set, so the recipe is not tuned on the numbers it is judged by.

Run: ``make sim-final-norm`` (about 5 minutes the first time, for the features; then a second or two a run, about
25 minutes for the grid on one core); ``--grid recipe-lr`` runs the recipe's lr and its neighbours only (5 seeds,
a minute or two), the check that chose the recipe's lr at the server's batch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from bench_learning import BATCH, PLAIN, Reference  # noqa: E402

from sglang_mezo.core.config import MezoConfig  # noqa: E402
from sglang_mezo.core.estimators import INITIAL_STATE, Adaptive, Estimator  # noqa: E402
from sglang_mezo.core.params import TrainablePiece, TrainableSet  # noqa: E402
from sglang_mezo.core.recipe import ONE_PROBE_STEP, RECIPE_STEP, Step  # noqa: E402
from sglang_mezo.core.run import run_step  # noqa: E402
from sglang_mezo.core.schedules import LRSchedule  # noqa: E402
from sglang_mezo.default_model import default_model_path  # noqa: E402
from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes  # noqa: E402
from sglang_mezo.jobs.spec import step_batches  # noqa: E402
from sglang_mezo.kernels import ZKind  # noqa: E402

CACHE = Path(__file__).with_name(".cache")
JUDGES = ("validation", "held_out")
GAIN = "model.norm.weight"


@dataclass(frozen=True)
class Features:
    """Per review, ``n(h) ⊙ (E_great - E_terrible)`` (float64 [reviews, 576]) and its label; the gap under gain g is
    ``x @ g``."""

    x: torch.Tensor
    y: torch.Tensor

    def gaps(self, gain: torch.Tensor) -> torch.Tensor:
        return self.x @ gain.double()

    def accuracy(self, gain: torch.Tensor) -> float:
        return float(((self.gaps(gain) > 0).long() == self.y).double().mean())

    def objective(self, gain: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """The classification objective's mean loss (a softmax over the two options = softplus of the signed gap),
        differentiable in ``gain``."""
        x, y = (self.x, self.y) if rows is None else (self.x[rows], self.y[rows])
        signed = (x @ gain.double()) * (2 * y.double() - 1)
        return torch.nn.functional.softplus(-signed).mean()

    def loss(self, gain: torch.Tensor, rows: list[int] | None = None) -> float:
        return float(self.objective(gain, rows))


def splits() -> dict[str, list[tuple[str, int]]]:
    """bench-learning's training set and its 1,000 held-out reviews (the same split, seed 0), and a validation
    split of 1,000 disjoint from both."""
    train, held_out, validation = balanced_split(rotten_tomatoes(), [500, 500, 500], seed=0)
    return {"train": train, "held_out": held_out, "validation": validation}


def features(ref: Reference, reviews: list[tuple[str, int]]) -> Features:
    """One forward per review; the final norm's input captured at the last prompt position."""
    model = ref.model
    norm = model.model.norm
    captured: list[torch.Tensor] = []
    hook = norm.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    rows = []
    try:
        for i in tqdm(range(0, len(reviews), 32), desc="features", unit="batch"):
            batch = ref.batch(reviews[i : i + 32])
            captured.clear()
            logits = ref.logits(batch)
            h = captured[0].double()
            last = torch.tensor([len(p) - 1 for p in batch.prompts])
            h = h[torch.arange(len(last)), last]
            normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            rows.append((normed, logits[:, 1] - logits[:, 0]))
    finally:
        hook.remove()
    head = model.get_output_embeddings().weight.double()
    delta = head[batch.option_ids[1]] - head[batch.option_ids[0]]
    x = (torch.cat([r[0] for r in rows]) * delta).detach()  # features, not a graph through the model
    gain = norm.weight.detach().double()
    check = torch.cat([r[1] for r in rows]).double()
    if not torch.allclose(x @ gain, check, rtol=1e-3, atol=1e-3):  # the model is not the form this script assumes
        raise SystemExit(f"cached features do not reproduce the model's gaps (max error "
                         f"{float((x @ gain - check).abs().max()):.3g})")
    return Features(x, torch.tensor([y for _, y in reviews]))


def load() -> tuple[dict[str, Features], torch.Tensor]:
    """The three splits' features and the pretrained gain, from the cache or from the model."""
    path = CACHE / "final-norm-features.pt"
    if path.exists():
        saved = torch.load(path)
        return {k: Features(v[0].detach(), v[1]) for k, v in saved["features"].items()}, saved["gain"].detach()
    ref = Reference(default_model_path(), PLAIN)
    out = {name: features(ref, reviews) for name, reviews in splits().items()}
    gain = ref.model.model.norm.weight.detach().clone().float()
    CACHE.mkdir(exist_ok=True)
    torch.save({"features": {k: (v.x, v.y) for k, v in out.items()}, "gain": gain}, path)
    return out, gain


@dataclass(frozen=True)
class Setting:
    """A final-norm job's knobs (the rest are the server's: one probe per estimator minimum, Rademacher z)."""

    lr: float = 1e-2
    eps: float = 1e-3
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    estimator: str = "spsa"
    n_probes: int = 1
    batch: int = BATCH
    adaptive: str = "scalar_rms"

    def label(self) -> str:
        parts = [f"lr {self.lr:g}", self.schedule + (f"→{self.min_lr_ratio:g}" if self.min_lr_ratio else ""),
                 f"ε {self.eps:g}", f"{self.estimator} n={self.n_probes}", f"batch {self.batch}"]
        return ", ".join(parts) + ("" if self.adaptive == "scalar_rms" else f", {self.adaptive}")

    def forwards_per_step(self) -> int:
        return self.batch * Estimator(self.estimator).forwards(self.n_probes)

    @classmethod
    def of(cls, step: Step, **changes) -> Setting:
        """A measured step of the core's recipe (``core/recipe.py``) at the server's batch, with ``changes``."""
        return cls(**{"lr": step.lr, "schedule": step.schedule.value, "estimator": step.estimator.value,
                      "n_probes": step.n_probes, **changes})


RECIPE = Setting.of(RECIPE_STEP)
"""What a job that names nothing runs: the row the server's no-knob row is checked against."""
FIRST_RECIPE = Setting.of(ONE_PROBE_STEP)
"""The recipe until 2026-12-05 (SPSA, one probe, lr 1e-2, constant)."""


def run(setting: Setting, data: dict[str, Features], gain0: torch.Tensor, *, budget: int, evals: int,
        seed: int) -> dict[str, list[tuple[int, float]]]:
    """Per scored split (validation, held-out): (example-forwards, accuracy) at ``evals`` points of a run of
    ``budget`` example-forwards. The run sees only the training split."""
    steps = max(1, budget // setting.forwards_per_step())
    config = MezoConfig(lr=setting.lr, eps=setting.eps, n_probes=setting.n_probes, z_kind=ZKind.RADEMACHER,
                        schedule=LRSchedule(setting.schedule), min_lr_ratio=setting.min_lr_ratio, total_steps=steps,
                        seed=seed, estimator=Estimator(setting.estimator), adaptive=Adaptive(setting.adaptive))
    gain = gain0.clone()
    params = TrainableSet.from_pieces([TrainablePiece(GAIN, gain, tuple(gain.shape))])
    train = data["train"]
    every = max(1, steps // evals)
    state = INITIAL_STATE
    curves = {judge: [(0, data[judge].accuracy(gain))] for judge in JUDGES}
    batches = step_batches(len(train.y), setting.batch, seed, range(steps))
    for step, rows in enumerate(batches):
        result = run_step(params, config, step, lambda rows=rows: train.loss(gain, rows), state=state)
        state = result.adaptive
        if (step + 1) % every == 0 or step + 1 == steps:
            for judge, curve in curves.items():
                curve.append(((step + 1) * setting.forwards_per_step(), data[judge].accuracy(gain)))
    return curves


def at(curve: list[tuple[int, float]], budget: int) -> float:
    return [a for f, a in curve if f <= budget][-1]


def ceiling(data: dict[str, Features], gain0: torch.Tensor) -> dict:
    """The subset's own ceiling: the gain fitted by gradient (L-BFGS on the whole training set, from the pretrained
    gain, with an L2 pull ``lam·|g - g0|²`` towards it), ``lam`` chosen on the validation split; its accuracy on
    each split, and every ``lam``'s."""
    train = data["train"]
    fits = {}
    for lam in (0.0, 1e-4, 1e-3, 1e-2, 1e-1):
        gain = gain0.double().clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([gain], max_iter=500, line_search_fn="strong_wolfe")

        def closure(gain: torch.Tensor = gain, lam: float = lam,
                    optimizer: torch.optim.Optimizer = optimizer) -> torch.Tensor:
            optimizer.zero_grad()
            loss = train.objective(gain) + lam * (gain - gain0.double()).pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        fits[lam] = {name: f.accuracy(gain.detach()) for name, f in data.items()}
    lam = max(fits, key=lambda k: fits[k]["validation"])
    return {"lam": lam, **fits[lam], "by_lam": {str(k): v for k, v in fits.items()}}


def server_check(curve: list[tuple[int, float]], path: Path) -> dict | None:
    """The recipe's simulated held-out curve (seed 0, the job's) against the server's no-knob row in
    ``bench-learning``'s json at the same points: the simulator's claim to stand for the server."""
    if not path.exists():
        return None
    rows = [c for c in json.loads(path.read_text())["curves"] if c["name"].startswith("no knobs")]
    if not rows:
        return None
    served = dict(zip(rows[0]["forwards"], rows[0]["accuracy"], strict=True))
    pairs = [(f, a, served[f]) for f, a in curve if f in served]
    return {"points": len(pairs), "max_abs_difference": max(abs(a - b) for _, a, b in pairs),
            "pairs": pairs}


GRID = {
    "lr": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "schedule": ("constant", "linear", "cosine"),
    "eps": (1e-3, 1e-2),
    "estimator+n": (("spsa", 1), ("spsa", 4), ("greedy", 4), ("fzoo", 8)),
    "batch": (4, 16, 64),
}


def grid() -> list[Setting]:
    out = []
    for lr, schedule, eps, (estimator, n), batch in itertools.product(*GRID.values()):
        out.append(Setting(lr=lr, schedule=schedule, eps=eps, estimator=estimator, n_probes=n, batch=batch))
    return out


def recipe_lr_grid() -> list[Setting]:
    """The recipe's step at lrs around its own, and the first recipe."""
    return [Setting.of(RECIPE_STEP, lr=lr) for lr in (0.1, 0.15, 0.2, 0.3, 0.5)] + [FIRST_RECIPE]


GRIDS = {"full": (grid, "sim-final-norm.json"), "recipe-lr": (recipe_lr_grid, "sim-final-norm-recipe-lr.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=64_000, help="example-forwards per run")
    parser.add_argument("--points", type=int, nargs="*", default=[16_000, 64_000],
                        help="budgets at which accuracies are reported")
    parser.add_argument("--grid", choices=list(GRIDS), default="full",
                        help="full: 360 settings; recipe-lr: the recipe's lr and its neighbours")
    parser.add_argument("--seeds", type=int, default=None, help="job seeds per setting (medians reported; default "
                                                                "3 for the full grid, 5 for recipe-lr)")
    parser.add_argument("--top", type=int, default=10, help="settings shown, best on validation first")
    parser.add_argument("--out", type=Path, default=None, help="the json (default: beside this script, per grid)")
    args = parser.parse_args()
    make_grid, name = GRIDS[args.grid]
    args.out = args.out or Path(__file__).with_name(name)
    args.seeds = args.seeds or (3 if args.grid == "full" else 5)
    torch.set_num_threads(1)  # [16-64, 576] products: threads cost more than they give, and leave a core free
    data, gain0 = load()
    began = time.perf_counter()
    settings = [RECIPE] + [s for s in make_grid() if s != RECIPE]
    rows = []
    for setting in tqdm(settings, desc="settings", unit="setting"):
        runs = [run(setting, data, gain0, budget=args.budget, evals=16, seed=s) for s in range(args.seeds)]
        rows.append({"setting": asdict(setting), "label": setting.label(),
                     **{judge: {p: statistics.median(at(r[judge], p) for r in runs) for p in args.points}
                        for judge in JUDGES},
                     "held_out_curve_seed0": runs[0]["held_out"]})
    last = args.points[-1]
    # chosen on validation only; their held-out figures are the same runs' (the runs never see either split)
    best = sorted(rows[1:], key=lambda r: -r["validation"][last])[: args.top]
    check = server_check(rows[0]["held_out_curve_seed0"], Path(__file__).with_name("bench-learning-64k.json"))
    for row in rows:  # the json keeps the curves of the rows it shows
        if row is not rows[0] and row not in best:
            del row["held_out_curve_seed0"]
    fitted = ceiling(data, gain0)
    args.out.write_text(json.dumps({"budget": args.budget, "seeds": args.seeds, "ceiling": fitted,
                                    "server_check": check,
                                    "zero_shot": {k: f.accuracy(gain0) for k, f in data.items()},
                                    "rows": rows, "seconds": time.perf_counter() - began}, indent=1))
    print(f"\nzero-shot: " + ", ".join(f"{k} {f.accuracy(gain0):.1%}" for k, f in data.items()))
    print(f"gradient-fitted gain (the subset's ceiling, L2 {fitted['lam']:g} chosen on validation): "
          + ", ".join(f"{k} {fitted[k]:.1%}" for k in data))
    if check:
        print(f"the recipe's simulated curve against the server's no-knob row: {check['points']} points, "
              f"largest difference {check['max_abs_difference']:.1%}")
    head = " | ".join(f"{judge} @ {p:,}" for judge in JUDGES for p in args.points)
    print(f"\n| setting | {head} |\n|---|" + "---|" * (len(JUDGES) * len(args.points)))
    for row in [rows[0], *best]:
        cells = [f"{row[judge][p]:.1%}" for judge in JUDGES for p in args.points]
        print(f"| {row['label']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
