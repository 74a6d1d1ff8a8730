"""The CPU engine: z regenerated and applied in place with plain PyTorch, in bounded chunks.

This is product code, not a test oracle: it is what runs on a laptop and in CI. It must give exactly the
stream that :mod:`sglang_mezo.kernels.stream` defines and the Triton kernels compute: the integer stream bit for bit,
the normals to the last fp32 bit but for rare
double-rounding cases.

uint32 arithmetic is emulated on int64 tensors: a 32x32-bit product fits in 64 bits *as bits* (it may wrap
into the sign), so ``(p >> 32) & MASK32`` is the high word and ``p & MASK32`` the low word. Work is done one
tile (≤ ``CHUNK`` elements) at a time, so the extra memory of a pass is O(CHUNK), never O(parameter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .stream import (
    MASK32,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    TWO_PI,
    UNIFORM_SCALE,
    ZKind,
    ZSlice,
)

CHUNK = 1 << 16
"""Elements per tile. 64k keeps the int64 temporaries in L2 and was ~10x faster than one huge tile."""


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values; the key (k0, k1) is a pair of Python ints."""
    for _ in range(PHILOX_ROUNDS):
        p0 = c0 * PHILOX_M0  # wraps in int64; the low 64 bits are the exact unsigned product
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = (
            ((p1 >> 32) & MASK32) ^ c1 ^ k0,
            p1 & MASK32,
            ((p0 >> 32) & MASK32) ^ c3 ^ k1,
            p0 & MASK32,
        )
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox_words(seed: int, key: int, groups: torch.Tensor) -> torch.Tensor:
    """The four uint32 words (as int64, shape ``groups.shape + (4,)``) of counter ``(group, key)``."""
    c0 = groups & MASK32
    c1 = groups >> 32
    c2 = torch.full_like(groups, key & MASK32)
    c3 = torch.full_like(groups, key >> 32)
    return torch.stack(philox4x32_10(c0, c1, c2, c3, seed & MASK32, seed >> 32), dim=-1)


def uniforms(words: torch.Tensor) -> torch.Tensor:
    """uint32 words -> float64 uniforms in (0, 1): (w + 0.5) · 2^-32, exact."""
    return (words.to(torch.float64) + 0.5) * UNIFORM_SCALE


def _gaussian_groups(seed: int, key: int, groups: torch.Tensor) -> torch.Tensor:
    """Four normals per group: shape ``groups.shape + (4,)``, lanes in stream order; float64 math, fp32 result."""
    u = uniforms(philox_words(seed, key, groups))
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))  # lanes (0,1) use u0, lanes (2,3) use u2
    phase = TWO_PI * u[..., 1::2]
    # interleave (r·cos, r·sin) per pair -> lanes 0, 1, 2, 3
    pairs = torch.stack((radius * torch.cos(phase), radius * torch.sin(phase)), dim=-1)
    return pairs.flatten(-2).to(torch.float32)


_BIT_SHIFTS = torch.arange(32, dtype=torch.int64)


def _rademacher_groups(seed: int, key: int, groups: torch.Tensor) -> torch.Tensor:
    """128 signs per group: shape ``groups.shape + (128,)``, bit (i & 31) of word ((i >> 5) & 3)."""
    words = philox_words(seed, key, groups)
    bits = (words.unsqueeze(-1) >> _BIT_SHIFTS) & 1
    return (1 - 2 * bits).to(torch.float32).flatten(-2)


_GROUP_LOG2 = {ZKind.GAUSSIAN: 2, ZKind.RADEMACHER: 7}


def z_runs(seed: int, key: int, starts: torch.Tensor, length: int, kind: ZKind) -> torch.Tensor:
    """z for ``len(starts)`` runs of ``length`` consecutive full-tensor indices: shape ``[runs, length]``, fp32.

    Each run generates the whole Philox groups that cover it (at most one group of waste at each end) and
    picks its elements out with a gather, so a run may start anywhere: a TP shard's rows, a padded vocabulary
    shard, or a column block of a row-parallel weight.
    """
    shift = _GROUP_LOG2[kind]
    per_group = 1 << shift
    n_groups = (length + per_group - 1) // per_group + 1
    groups = (starts >> shift).unsqueeze(1) + torch.arange(n_groups, dtype=torch.int64)
    if kind is ZKind.GAUSSIAN:
        values = _gaussian_groups(seed, key, groups).flatten(1)
    else:
        values = _rademacher_groups(seed, key, groups).flatten(1)
    first = starts & (per_group - 1)
    if length == values.shape[1] - per_group and bool((first == 0).all()):
        return values[:, :length]
    index = first.unsqueeze(1) + torch.arange(length, dtype=torch.int64)
    return torch.gather(values, 1, index)


def zaxpy_torch_(
    theta: torch.Tensor,
    where: ZSlice,
    *,
    seeds: Sequence[int],
    restore: Sequence[float],
    update: Sequence[float],
    decay: float,
    kind: ZKind,
) -> None:
    """theta ← (theta + Σ_k restore[k]·z_k)·decay + Σ_k update[k]·z_k, in place, fp32 math, one tile at a time.

    ``theta`` is a 2-D block (unit stride along columns) whose element (r, c) is element
    ``(row_offset + r) * full_cols + col_offset + c`` of the full tensor (see :class:`ZSlice`). Coefficients are
    rounded to fp32 first, as the Triton kernel sees them, and accumulated in the same order.
    """
    key, full_cols, row_offset, col_offset = where.key, where.full_cols, where.row_offset, where.col_offset
    rows, cols = theta.shape
    if rows == 0 or cols == 0:
        return
    restore_f = [torch.tensor(c, dtype=torch.float32) for c in restore]
    update_f = [torch.tensor(c, dtype=torch.float32) for c in update]
    decay_f = torch.tensor(decay, dtype=torch.float32)
    # A block that covers whole rows of its full tensor, stored contiguously, is one run of indices: treat it
    # as a single row so that runs are long and no Philox group is generated twice.
    if cols == full_cols and col_offset == 0 and theta.is_contiguous():
        theta = theta.view(1, rows * cols)
        full_cols = rows * cols
        row_offset, col_offset = 0, row_offset * cols
        rows, cols = theta.shape
    tile_cols = min(cols, CHUNK)
    # a run generates whole Philox groups plus one spare at most: bound the tile by what is generated
    per_group = 1 << _GROUP_LOG2[kind]
    generated_per_row = ((tile_cols + per_group - 1) // per_group + 1) * per_group
    tile_rows = max(1, CHUNK // generated_per_row)
    for r0 in range(0, rows, tile_rows):
        r1 = min(rows, r0 + tile_rows)
        row_starts = (torch.arange(r0, r1, dtype=torch.int64) + row_offset) * full_cols + col_offset
        for c0 in range(0, cols, tile_cols):
            c1 = min(cols, c0 + tile_cols)
            block = theta[r0:r1, c0:c1]
            restore_acc = torch.zeros(block.shape, dtype=torch.float32)
            update_acc = torch.zeros(block.shape, dtype=torch.float32)
            for seed, a, b in zip(seeds, restore_f, update_f, strict=True):
                z = z_runs(seed, key, row_starts + c0, c1 - c0, kind)
                restore_acc += a * z
                update_acc += b * z
            block.copy_((block.to(torch.float32) + restore_acc) * decay_f + update_acc)
