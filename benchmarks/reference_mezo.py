"""The reference rows of the benchmarks: MeZO as the paper writes it (Malladi et al. 2023, Algorithm 1), plainly in
PyTorch on a transformers model, and the scoring it needs. Our own code, written to be obvious, not fast: it is what
"the naive loop" means when a benchmark says our step beats it.

Algorithm 1, one step with seed s:  θ += εz;  L+ = L(θ);  θ -= 2εz;  L- = L(θ);  θ += εz;  g = (L+ - L-)/(2ε);
θ -= lr·g·z. z is drawn from the torch RNG reseeded with s before each of the four passes (``torch.normal`` or, for
Rademacher, ``torch.randint`` mapped to ±1), one parameter at a time, as the paper's code does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang_mezo.kernels import ZKind


@dataclass(frozen=True)
class ChoiceBatch:
    """Prompts (token ids) and their one-token options; ``labels[i]`` indexes ``option_ids``."""

    prompts: tuple[tuple[int, ...], ...]
    option_ids: tuple[int, ...]
    labels: tuple[int, ...]


def choice_logits(model: torch.nn.Module, batch: ChoiceBatch, *, grad: bool = False) -> torch.Tensor:
    """[examples, options] logits of the options at the last prompt position: one right-padded forward (with
    autograd only when ``grad``)."""
    width = max(map(len, batch.prompts))
    ids = torch.zeros((len(batch.prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(batch.prompts):
        ids[i, : len(prompt)] = torch.tensor(prompt)
        mask[i, : len(prompt)] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with contextlib.nullcontext() if grad else torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[torch.arange(len(batch.prompts), device=device), mask.sum(1) - 1][:, list(batch.option_ids)]


def choice_loss(model: torch.nn.Module, batch: ChoiceBatch) -> float:
    """Mean cross-entropy over the options' logits at the last prompt position."""
    last = choice_logits(model, batch).double()
    return float(torch.nn.functional.cross_entropy(last, torch.tensor(batch.labels, device=last.device)))


def _z(param: torch.Tensor, kind: ZKind) -> torch.Tensor:
    if kind is ZKind.GAUSSIAN:
        return torch.normal(0.0, 1.0, size=param.shape, dtype=param.dtype, device=param.device)
    return torch.randint(0, 2, param.shape, dtype=param.dtype, device=param.device) * 2 - 1


def perturb(params: Sequence[torch.Tensor], seed: int, scale: float, kind: ZKind) -> None:
    """One of the paper's passes: θ += scale·z, z drawn tensor by tensor from the torch RNG reseeded with ``seed``
    (on the tensors' device)."""
    torch.manual_seed(seed)
    for p in params:
        p.data.add_(_z(p, kind), alpha=scale)


def paper_step(model: torch.nn.Module, params: Sequence[torch.Tensor], batch: ChoiceBatch, *, seed: int, eps: float,
               lr: float, kind: ZKind) -> tuple[float, float]:
    """One step of Algorithm 1 on ``params`` in place; returns (L+, L-)."""
    perturb(params, seed, eps, kind)
    loss_plus = choice_loss(model, batch)
    perturb(params, seed, -2 * eps, kind)
    loss_minus = choice_loss(model, batch)
    perturb(params, seed, eps, kind)
    grad = (loss_plus - loss_minus) / (2 * eps)
    perturb(params, seed, -lr * grad, kind)
    return loss_plus, loss_minus
