"""Low-rank directions (stream version 2): z = U·Vᵀ/√r for a matrix, regenerated from the seed, applied in place.

LOZO (Chen et al., arXiv 2410.07698) and SubZero perturb each weight matrix with a low-rank product instead of a
dense z: the gradient of a linear layer is a sum of few outer products, and a rank-r probe explores that
structure. Here the factors are two streams of the existing kinds (:mod:`.stream`, version 1, Gaussian or
Rademacher), so they need no storage and nothing new to compile:

* U = the stream of key ``factor_key(key, 0)`` over an [R, r] tensor (U[i, a] is its element i·r + a) and
  V = the stream of key ``factor_key(key, 1)`` over a [C, r] tensor, for a matrix viewed as [R, C];
* z[i, j] = (U[i, 0]·V[j, 0] + U[i, 1]·V[j, 1] + … + U[i, r-1]·V[j, r-1]) · c_r, in fp32: each product rounded,
  summed left to right (no fused multiply-add), times c_r = fp32(1/√r). With unit-variance factors E[z zᵀ] = I,
  so SPSA's estimate stays unbiased; Var z = 1.
* Tensors of one dimension (norms' gains, biases) keep the dense z of the kind: they have no low-rank structure.

The pass is PyTorch's elementwise arithmetic on either device (fp32 products and sums are correctly rounded on a
CPU and on a GPU alike, and each op is its own kernel, so nothing contracts into an FMA): the same bits everywhere
the factors are the same, which the version-1 streams are (Rademacher exactly, Gaussian but for the rare
double-rounding case :mod:`.stream` describes). It runs one tile of rows at a time: its extra memory is a tile per
probe, never a parameter-sized copy. It is not the fused kernel's speed (r + 1 elementwise passes over each tile
in cache, plus the tiny factors): a first version, to measure whether low rank learns better before it earns a
kernel of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .stream import ZKind, ZSlice, hash63

MAX_RANK = 64
TILE = 1 << 16
"""Elements per tile of the pass (rows × columns, at least one row)."""

DenseZ = Callable[[int, ZSlice, tuple[int, int], ZKind, torch.device], torch.Tensor]
"""The dense pass's z for a block (seed, where, shape, kind, device) as a new fp32 tensor: the factors' maker.
:mod:`.ops` passes its own in (it dispatches low-rank targets here, so this module cannot import it)."""


def factor_key(key: int, which: int) -> int:
    """The stream key of factor ``which`` (0: U, 1: V) of the tensor keyed ``key``: a 63-bit hash, like the keys."""
    return hash63(f"lowrank:{key}:{which}")


def check_rank(rank: int) -> int:
    rank = int(rank)
    if not 0 <= rank <= MAX_RANK:
        raise ValueError(f"the rank of a low-rank z must be in [0, {MAX_RANK}] (0: a dense z), got {rank}")
    return rank


def factors(dense: DenseZ, seed: int, where: ZSlice, rows: int, cols: int, kind: ZKind, rank: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """U's rows and V's rows for a block of ``rows`` × ``cols`` at ``where`` in its matrix: [rows, r], [cols, r]."""
    u = dense(seed, ZSlice(factor_key(where.key, 0), rank, where.row_offset, 0), (rows, rank), kind, device)
    v = dense(seed, ZSlice(factor_key(where.key, 1), rank, where.col_offset, 0), (cols, rank), kind, device)
    return u, v


def lowrank_z(u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """z = (Σ_a u[:, a]·v[:, a]ᵀ, left to right) · scale for the rows of ``u``: [rows, cols] fp32."""
    z = u[:, 0:1] * v[:, 0].unsqueeze(0)
    for a in range(1, u.shape[1]):
        z = z + u[:, a : a + 1] * v[:, a].unsqueeze(0)
    return z * scale


def rank_scale(rank: int, device: torch.device) -> torch.Tensor:
    """c_r = fp32(1/√r), as a 0-d fp32 tensor (so that multiplying by it stays in fp32)."""
    return torch.tensor(1.0 / math.sqrt(rank), dtype=torch.float32, device=device)


def zaxpy_lowrank_(
    source: torch.Tensor,
    out: torch.Tensor | None,
    where: ZSlice,
    *,
    seeds: Sequence[int],
    restore: Sequence[float],
    update: Sequence[float],
    decay: float,
    kind: ZKind,
    rank: int,
    dense: DenseZ,
    write_back: bool = True,
) -> None:
    """θ ← (θ + Σ_k restore[k]·z_k)·decay + Σ_k update[k]·z_k with low-rank z_k, θ read from the 2-D block
    ``source`` (any float dtype; fp32 math) and the result written to ``out`` (rounded) if given and back to
    ``source`` if ``write_back``; ``dense`` makes the factors. The accumulation is the dense kernels': restore and
    update terms summed in seed order from 0, then (θ + Σ restore)·decay + Σ update, each op rounded to fp32."""
    rows, cols = source.shape
    if rows == 0 or cols == 0:
        return
    rank = check_rank(rank)
    device = source.device
    as32 = lambda c: torch.tensor(c, dtype=torch.float64).to(torch.float32).to(device)
    terms = [(seed, as32(a), as32(b)) for seed, a, b in zip(seeds, restore, update, strict=True)
             if a != 0 or b != 0]  # a zero coefficient adds +0 to an accumulator that is never -0: no bit changes
    made = [(factors(dense, seed, where, rows, cols, kind, rank, device), a, b) for seed, a, b in terms]
    scale = rank_scale(rank, device)
    d = as32(decay)
    step = max(1, TILE // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        theta = source[r0:r1].to(torch.float32)
        racc = torch.zeros_like(theta)
        uacc = torch.zeros_like(theta)
        for (u, v), a, b in made:
            z = lowrank_z(u[r0:r1], v, scale)
            racc = racc + a * z
            uacc = uacc + b * z
        theta = (theta + racc) * d + uacc
        if out is not None:
            out[r0:r1].copy_(theta)
        if write_back:
            source[r0:r1].copy_(theta)
