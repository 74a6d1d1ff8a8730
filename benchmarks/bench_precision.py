"""What MeZO's in-place arithmetic does to low-precision weights, measured with the project's own kernels.

For each weight dtype and population of weights:
* round trip: θ += εz; θ -= 2εz; θ += εz (ε = 1e-3), the perturbation sequence of one probe. Reported: the
  fraction of entries that do not come back bit-exactly, and the fraction that the +εz perturbation did not
  move at all (the probe never saw them), and the worst error relative to the weights' RMS;
* update: θ -= lr·g·z with lr·g = 1e-6, MeZO's typical step. Reported: the fraction of entries left unchanged, and
  the fraction of the update's mass lost, 1 - <Δ_applied, Δ_intended> / ‖Δ_intended‖² (0: applied exactly,
  1: nothing applied; rounding that overshoots counts against the loss).

Populations: "matrix" ~ N(0, 0.02²), the scale of a Llama projection; "norm" ~ N(1, 0.05²), RMSNorm gains. Both
z kinds. Pass ``--model DIR`` to measure a Hugging Face checkpoint's own tensors instead.
Run: ``make bench-precision`` (CPU, about a minute).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from sglang_mezo.kernels import ZKind, ZSlice, ZTarget, tensor_key, zaxpy_

EPS = 1e-3
LR_G = 1e-6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def measure(base: torch.Tensor, dtype: torch.dtype, kind: ZKind) -> dict[str, float]:
    where = ZSlice(tensor_key("bench"), base.numel())
    theta = base.to(dtype)
    original = theta.clone()
    target = [ZTarget(theta, where, decay=False)]

    zaxpy_(target, [1], [EPS], kind=kind)
    unmoved = (theta == original).double().mean().item()
    zaxpy_(target, [1], [-2 * EPS], kind=kind)
    zaxpy_(target, [1], [EPS], kind=kind)
    not_back = (theta != original).double().mean().item()
    rms = original.double().pow(2).mean().sqrt().item()
    worst_rel = (theta.double() - original.double()).abs().max().item() / rms

    theta.copy_(original)
    zaxpy_(target, [2], [0.0], [-LR_G], kind=kind)
    applied = theta.double() - original.double()
    intended = torch.zeros_like(applied)
    zaxpy_([ZTarget(intended, where, decay=False)], [2], [0.0], [-LR_G], kind=kind)  # exact in float64 storage
    unchanged = (applied == 0).double().mean().item()
    lost = 1 - (applied * intended).sum().item() / (intended * intended).sum().item()
    return {"unmoved": unmoved, "not_back": not_back, "worst_rel": worst_rel, "unchanged": unchanged,
            "lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a Hugging Face checkpoint directory (default: synthetic populations)")
    parser.add_argument("--numel", type=int, default=1 << 20)
    args = parser.parse_args()

    print(f"# bench_precision  ε={EPS}  lr·g={LR_G}  {platform.machine()} {time.strftime('%Y-%m-%d')}")
    print("| weights | dtype | z | +εz left unmoved | not back after ±ε round trip | worst round-trip error / RMS(θ) "
          "| update: entries unchanged | update: mass lost |")
    print("|---|---|---|---|---|---|---|---|")
    for pop_name, base in populations(args.model, args.numel).items():
        for dtype_name, dtype in DTYPES.items():
            for kind in ZKind:
                m = measure(base, dtype, kind)
                print(f"| {pop_name} | {dtype_name} | {kind.value} | {m['unmoved']:.1%} | {m['not_back']:.1%} "
                      f"| {m['worst_rel']:.1e} | {m['unchanged']:.1%} | {m['lost']:.1%} |")


if __name__ == "__main__":
    main()
