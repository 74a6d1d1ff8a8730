"""Per-tensor scales from the pre-trained weights (``tensor_scale = pretrained_rms``): pure arithmetic on what the
caller reads (the server reads the checkpoint on disk one tensor at a time, once per set a job asks to scale)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

FLOOR = 1e-3
"""A tensor's scale is at least this fraction of the set's: a tensor the checkpoint holds as zeros (a bias) still
moves, a thousand times less than a typical one."""


def square_sum(tensor: torch.Tensor) -> tuple[float, int]:
    """(Σ t², number of elements) of a tensor, in float64: what :func:`pretrained_rms_scales` needs of it."""
    return float(tensor.detach().double().square().sum()), tensor.numel()


def set_rms(sums: Mapping[str, tuple[float, int]]) -> float:
    """rms(set), with rms(set)² = Σ_t Σ t² / Σ_t n_t, from each tensor's :func:`square_sum`: what the scales are
    relative to, and what the recipe's lr for a scaled set is in proportion to (core/recipe.py)."""
    if not sums:
        raise ValueError("no tensors to scale")
    empty = [n for n, (_, count) in sums.items() if count == 0]
    if empty:
        raise ValueError(f"empty tensors cannot be scaled: {empty[:3]}")
    whole = math.sqrt(math.fsum(sq for sq, _ in sums.values()) / sum(count for _, count in sums.values()))
    if not (whole > 0 and math.isfinite(whole)):
        raise ValueError("the tensors to scale are all zero (or not finite): no scale can be set against them")
    return whole


def pretrained_rms_scales(sums: Mapping[str, tuple[float, int]]) -> dict[str, float]:
    """s_t = rms(t) / rms(set), floored at :data:`FLOOR`, from each tensor's :func:`square_sum`: the scales' mean
    square, weighted by size, is 1 (before the floor), so a step's norm does not change with them."""
    whole = set_rms(sums)
    return {n: max(FLOOR, math.sqrt(sq / count) / whole) for n, (sq, count) in sums.items()}
