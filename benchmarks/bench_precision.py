"""What MeZO's in-place arithmetic does to low-precision weights, measured with the project's own kernels.

For each weight dtype and population of weights:
* round trip: θ += εz; θ -= 2εz; θ += εz (ε = 1e-3), the perturbation sequence of one probe. Reported: the
  fraction of entries that do not come back bit-exactly, and the fraction that the +εz perturbation did not
  move at all (the probe never saw them), and the worst error relative to the weights' RMS;
* update: θ -= lr·g·z with lr·g = 1e-6, MeZO's typical step. Reported: the fraction of entries left unchanged, and
  the fraction of the update's mass lost, 1 - <Δ_applied, Δ_intended> / ‖Δ_intended‖² (0: applied exactly,
  1: nothing applied; rounding that overshoots counts against the loss).

Modes: the weights trained in place in fp32, bf16, fp16; and bf16 / fp16 served from an fp32 master
(``--mezo-master``, :mod:`sglang_mezo.core.master`), where the probe is round(master + εz), the restore
round(master) and the update lands in the master (the "update" columns then measure the master; the served
weights are its rounding).

Populations: "matrix" ~ N(0, 0.02²), the scale of a Llama projection; "norm" ~ N(1, 0.05²), RMSNorm gains. Both
z kinds. Pass ``--model DIR`` to measure a Hugging Face checkpoint's own tensors instead.

A second table: the cost of each mode, bytes per trainable parameter and the time of a probe pass and of a commit
pass over the same elements as ratios to the fp32 in-place pass, medians of ``--reps`` interleaved repetitions.
Run: ``make bench-precision`` (CPU, a few minutes).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from sglang_mezo.core.master import MasterWeights
from sglang_mezo.core.params import TrainablePiece, TrainableSet
from sglang_mezo.kernels import ZKind, ZTarget, zaxpy_

EPS = 1e-3
LR_G = 1e-6
# mode -> (served dtype, fp32 master?)
MODES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
         "bf16 + fp32 master": (torch.bfloat16, True), "fp16 + fp32 master": (torch.float16, True)}
# the alternative measured against masters (fidelity only: written here in PyTorch, not a fused kernel): bf16
# weights in place whose updates are stochastically rounded (unbiased in expectation, no extra memory)
SR = "bf16 + stochastic rounding"


def populations(model_dir: str | None, n: int) -> dict[str, torch.Tensor]:
    if model_dir is None:
        gen = torch.Generator().manual_seed(0)
        return {
            "matrix N(0,0.02)": torch.randn(n, generator=gen) * 0.02,
            "norm N(1,0.05)": 1 + torch.randn(n, generator=gen) * 0.05,
        }
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    matrices = [p.detach().flatten() for name, p in model.named_parameters() if p.dim() >= 2]
    norms = [p.detach().flatten() for name, p in model.named_parameters() if "norm" in name]
    pick = torch.cat(matrices)
    pick = pick[torch.randperm(pick.numel(), generator=torch.Generator().manual_seed(0))[:n]]
    return {"model matrices": pick.clone(), "model norms": torch.cat(norms).clone()}


class Weights:
    """One block trained in a mode: ``apply`` is the core's pass (TrainableSet.apply), ``truth`` what it holds."""

    def __init__(self, base: torch.Tensor, dtype: torch.dtype, master: bool, stochastic: bool = False) -> None:
        self.stochastic = stochastic
        self.served = base.to(dtype).view(1, -1)
        masters = MasterWeights() if master else None
        if masters is not None:
            masters.load(self.served, base)  # the truth starts from the fp32 values, as a server's from its checkpoint
        self.params = TrainableSet.from_pieces([TrainablePiece("bench", self.served, (base.numel(),))],
                                               masters=masters)
        [self.target] = self.params.targets

    def apply(self, seeds, restore, update=None, *, kind: ZKind) -> None:
        if self.stochastic and update is not None and any(update):
            exact = self.served.float()
            zaxpy_([ZTarget(exact, self.target.where, decay=False)], seeds, restore, update, kind=kind)
            self.served.copy_(stochastic_round(exact, seed=seeds[0]))
        else:
            self.params.apply(seeds, restore, update, kind=kind)

    @property
    def truth(self) -> torch.Tensor:
        return self.served if self.target.master is None else self.target.master


def stochastic_round(x: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (random low 16 bits added, then
    truncated)."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    bits = (x.view(torch.int32) + noise) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def measure(base: torch.Tensor, dtype: torch.dtype, master: bool, kind: ZKind,
            stochastic: bool = False) -> dict[str, float]:
    weights = Weights(base, dtype, master, stochastic)
    served, original = weights.served, weights.served.clone()
    weights.apply([1], [EPS], kind=kind)
    unmoved = (served == original).double().mean().item()
    weights.apply([1], [-2 * EPS], kind=kind)
    weights.apply([1], [EPS], kind=kind)
    not_back = (served != original).double().mean().item()
    rms = original.double().pow(2).mean().sqrt().item()
    worst_rel = (served.double() - original.double()).abs().max().item() / rms

    weights = Weights(base, dtype, master, stochastic)
    before = weights.truth.clone()
    weights.apply([2], [0.0], [-LR_G], kind=kind)
    applied = weights.truth.double() - before.double()
    intended = torch.zeros_like(applied)
    zaxpy_([ZTarget(intended, weights.target.where, decay=False)], [2], [0.0], [-LR_G], kind=kind)  # float64
    unchanged = (applied == 0).double().mean().item()
    lost = 1 - (applied * intended).sum().item() / (intended * intended).sum().item()
    return {"unmoved": unmoved, "not_back": not_back, "worst_rel": worst_rel, "unchanged": unchanged,
            "lost": lost}


def costs(base: torch.Tensor, kind: ZKind, reps: int) -> dict[str, tuple[int, float, float]]:
    """mode -> (bytes per parameter, probe pass / fp32 pass, commit pass / fp32 pass), medians of ``reps``."""
    blocks = {mode: Weights(base, dtype, master) for mode, (dtype, master) in MODES.items()}
    times: dict[str, tuple[list[float], list[float]]] = {mode: ([], []) for mode in MODES}
    for rep in range(reps + 1):  # interleaved: every mode sees the same machine; the first rep warms up
        for mode, weights in blocks.items():
            began = time.perf_counter()
            weights.apply([rep + 10], [EPS], kind=kind)
            probe = time.perf_counter() - began
            began = time.perf_counter()
            weights.apply([rep + 10], [-EPS], [-LR_G], kind=kind)
            commit = time.perf_counter() - began
            if rep:
                times[mode][0].append(probe)
                times[mode][1].append(commit)
    reference = statistics.median(times["fp32"][0])
    out = {}
    for mode, (dtype, master) in MODES.items():
        nbytes = torch.empty((), dtype=dtype).element_size() + (4 if master else 0)
        out[mode] = (nbytes, statistics.median(times[mode][0]) / reference,
                     statistics.median(times[mode][1]) / reference)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a Hugging Face checkpoint directory (default: synthetic populations)")
    parser.add_argument("--numel", type=int, default=1 << 20)
    parser.add_argument("--cost-numel", type=int, default=1 << 24, help="elements of the timed block")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()

    print(f"# bench_precision  ε={EPS}  lr·g={LR_G}  {platform.machine()}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| weights | mode | z | +εz left unmoved | not back after ±ε round trip | worst round-trip error / RMS(θ) "
          "| update: entries unchanged | update: mass lost |")
    print("|---|---|---|---|---|---|---|---|")
    for pop_name, base in populations(args.model, args.numel).items():
        for mode, (dtype, master, stochastic) in [(m, (*v, False)) for m, v in MODES.items()] + [
                (SR, (torch.bfloat16, False, True))]:
            for kind in ZKind:
                m = measure(base, dtype, master, kind, stochastic)
                print(f"| {pop_name} | {mode} | {kind.value} | {m['unmoved']:.1%} | {m['not_back']:.1%} "
                      f"| {m['worst_rel']:.1e} | {m['unchanged']:.1%} | {m['lost']:.1%} |")

    base = torch.randn(args.cost_numel, generator=torch.Generator().manual_seed(1)) * 0.02
    print(f"\n{args.cost_numel:,} elements, Rademacher z, medians of {args.reps} interleaved repetitions\n")
    print("| mode | bytes per trainable parameter | probe pass / fp32 pass | commit pass / fp32 pass |")
    print("|---|---|---|---|")
    for mode, (nbytes, probe, commit) in costs(base, ZKind.RADEMACHER, args.reps).items():
        print(f"| {mode} | {nbytes} | {probe:.2f} | {commit:.2f} |")


if __name__ == "__main__":
    main()
