"""The CPU engine, compiled: z regenerated and applied in place by a multi-threaded numba kernel.

The same pass as :func:`.z_torch.zaxpy_torch_` (which stays the readable reference and the path for dtypes numba
cannot hold), bit for bit: the integer stream exactly, the coefficients rounded to fp32 and accumulated in the same
order with the same separate roundings (LLVM never contracts a multiply and an add into an FMA unless told to,
and nothing here tells it to). The Box–Muller transform runs in float64 through libm and is rounded once to fp32,
as :mod:`.stream` defines; where libm and torch's vectorised float64 functions differ in the last float64 bit, the
fp32 results differ only for values within that bit of an fp32 rounding boundary (about one element in 2^29).

Why numba: the torch path emulates uint32 arithmetic on int64 tensors and materialises every intermediate of ten
Philox rounds, ~25x off memory speed. A compiled loop keeps the Philox state in registers and makes one read and
one write of the weights per pass. numba installs as a wheel from the package registry (no compiler on the
target machine), compiles on first use and caches the machine code on disk.

Work is split into tiles of at most ``TILE`` consecutive elements of one row, run in parallel (``prange``) on
numba's threads, as many as torch's intra-op threads; each tile allocates two ``TILE``-sized accumulators, so the
extra memory of a pass is O(threads · TILE), never O(parameter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np
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

TILE = 1 << 13
"""Elements per tile: 32 KiB of fp32 accumulators each, in L1/L2; a multiple of 128 so that tiles of an aligned
run start on a Rademacher group."""

SUPPORTED = (torch.float32,)
"""The dtypes this kernel reads and writes; others take the PyTorch path."""

# numba types integer constants by value: uint64 throughout, so that no operation mixes signed and unsigned
# (which numba would promote to float64).
_M0 = np.uint64(PHILOX_M0)
_M1 = np.uint64(PHILOX_M1)
_W0 = np.uint64(PHILOX_W0)
_W1 = np.uint64(PHILOX_W1)
_MASK = np.uint64(MASK32)
_S32 = np.uint64(32)
_ONE = np.uint64(1)
_ROUNDS = PHILOX_ROUNDS


@numba.njit(cache=True, inline="always")
def _philox(c0, c1, c2, c3, k0, k1):  # pragma: no cover - compiled
    """Philox4x32-10 on uint64 values that hold uint32s: a 32x32-bit product fits in 64 bits exactly."""
    for _ in range(_ROUNDS):
        p0 = c0 * _M0
        p1 = c2 * _M1
        c0, c1, c2, c3 = ((p1 >> _S32) ^ c1 ^ k0) & _MASK, p1 & _MASK, ((p0 >> _S32) ^ c3 ^ k1) & _MASK, p0 & _MASK
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    return c0, c1, c2, c3


@numba.njit(cache=True, inline="always")
def _uniform(w):  # pragma: no cover - compiled
    return (np.float64(w) + 0.5) * UNIFORM_SCALE


@numba.njit(cache=True)
def _fill_gaussian(seed, key, start, n, z):  # pragma: no cover - compiled
    """z[j] = z(start + j) for j < n, Gaussian z of stream version 1 (lanes 0, 1 from (u0, u1); 2, 3 from (u2, u3))."""
    s0, s1 = seed & _MASK, seed >> _S32
    k2, k3 = key & _MASK, key >> _S32
    first = start & np.uint64(3)
    groups = (first + np.uint64(n) + np.uint64(3)) >> np.uint64(2)
    g0 = start >> np.uint64(2)
    for q in range(groups):
        g = g0 + np.uint64(q)
        w0, w1, w2, w3 = _philox(g & _MASK, g >> _S32, k2, k3, s0, s1)
        r01 = math.sqrt(-2.0 * math.log(_uniform(w0)))
        p01 = TWO_PI * _uniform(w1)
        r23 = math.sqrt(-2.0 * math.log(_uniform(w2)))
        p23 = TWO_PI * _uniform(w3)
        base = 4 * q - np.int64(first)  # index in z of this group's lane 0
        if base >= 0 and base + 4 <= n:
            z[base] = np.float32(r01 * math.cos(p01))
            z[base + 1] = np.float32(r01 * math.sin(p01))
            z[base + 2] = np.float32(r23 * math.cos(p23))
            z[base + 3] = np.float32(r23 * math.sin(p23))
        else:  # the first or last group of a run: only the lanes inside it
            for lane in range(4):
                j = base + lane
                if 0 <= j < n:
                    r = r01 if lane < 2 else r23
                    p = p01 if lane < 2 else p23
                    z[j] = np.float32(r * (math.cos(p) if lane % 2 == 0 else math.sin(p)))


@numba.njit(cache=True, inline="always")
def _signs(w, z, at):  # pragma: no cover - compiled
    """z[at + b] = +1 if bit b of word w is 0 else -1, for b < 32."""
    for b in range(32):
        z[at + b] = np.float32(1) - np.float32(2) * np.float32((w >> np.uint64(b)) & _ONE)


@numba.njit(cache=True)
def _fill_rademacher(seed, key, start, n, z):  # pragma: no cover - compiled
    """z[j] = z(start + j) for j < n, Rademacher z of stream version 1: bit (i & 31) of word ((i >> 5) & 3) of
    group i >> 7, +1 for 0 and -1 for 1."""
    s0, s1 = seed & _MASK, seed >> _S32
    k2, k3 = key & _MASK, key >> _S32
    first = np.int64(start & np.uint64(127))
    groups = (first + n + 127) >> 7
    g0 = start >> np.uint64(7)
    for q in range(groups):
        g = g0 + np.uint64(q)
        w0, w1, w2, w3 = _philox(g & _MASK, g >> _S32, k2, k3, s0, s1)
        base = 128 * q - first  # index in z of this group's element 0
        lo = max(0, -base)
        hi = min(128, n - base)
        if lo == 0 and hi == 128:  # a whole group: branch-free loops over each word's 32 bits, which vectorise
            _signs(w0, z, base)
            _signs(w1, z, base + 32)
            _signs(w2, z, base + 64)
            _signs(w3, z, base + 96)
            continue
        for e in range(lo, hi):
            word = e >> 5
            w = w0 if word == 0 else (w1 if word == 1 else (w2 if word == 2 else w3))
            z[base + e] = np.float32(1 - 2 * np.int64((w >> np.uint64(e & 31)) & _ONE))


@numba.njit(cache=True, parallel=True)
def _zaxpy_kernel(theta, full_cols, row_offset, col_offset, key, seeds, restore, update, decay,
                  gaussian):  # pragma: no cover - compiled
    rows, cols = theta.shape
    tiles_per_row = (cols + TILE - 1) // TILE
    for t in numba.prange(rows * tiles_per_row):
        r = t // tiles_per_row
        c0 = (t % tiles_per_row) * TILE
        n = min(TILE, cols - c0)
        start = np.uint64((row_offset + r) * full_cols + col_offset + c0)
        z = np.empty(n, dtype=np.float32)
        racc = np.zeros(n, dtype=np.float32)
        uacc = np.zeros(n, dtype=np.float32)
        # a zero coefficient adds +0 or -0 to an accumulator that is never -0: skipping it changes no bit
        last = -1
        for k in range(seeds.shape[0]):
            if restore[k] != 0 or update[k] != 0:
                last = k
        for k in range(last + 1):
            a, b = restore[k], update[k]
            if a == 0 and b == 0:
                continue
            if gaussian:
                _fill_gaussian(seeds[k], key, start, n, z)
            else:
                _fill_rademacher(seeds[k], key, start, n, z)
            row = theta[r]
            if k < last:
                for j in range(n):
                    racc[j] += a * z[j]
                    uacc[j] += b * z[j]
            else:  # the last term, fused with the write: the same roundings in the same order, one loop fewer
                for j in range(n):
                    row[c0 + j] = (row[c0 + j] + (racc[j] + a * z[j])) * decay + (uacc[j] + b * z[j])
        if last < 0:
            row = theta[r]
            for j in range(n):
                row[c0 + j] = (row[c0 + j] + racc[j]) * decay + uacc[j]


def zaxpy_numba_(
    theta: torch.Tensor,
    where: ZSlice,
    *,
    seeds: Sequence[int],
    restore: Sequence[float],
    update: Sequence[float],
    decay: float,
    kind: ZKind,
) -> None:
    """theta ← (theta + Σ_k restore[k]·z_k)·decay + Σ_k update[k]·z_k, in place: :func:`.z_torch.zaxpy_torch_`'s
    contract and result, compiled. ``theta`` is a 2-D fp32 CPU block with unit column stride."""
    if theta.dtype not in SUPPORTED or theta.device.type != "cpu":
        raise TypeError(f"the compiled CPU kernel takes fp32 CPU tensors, not {theta.dtype} on {theta.device}")
    rows, cols = theta.shape
    if rows == 0 or cols == 0:
        return
    full_cols, row_offset, col_offset = where.full_cols, where.row_offset, where.col_offset
    # whole rows, contiguous: one run of indices, so that tiles are full and no Philox group is made twice
    if cols == full_cols and col_offset == 0 and theta.is_contiguous():
        theta = theta.view(1, rows * cols)
        full_cols, row_offset, col_offset = rows * cols, 0, row_offset * cols
    threads = torch.get_num_threads()
    if numba.get_num_threads() != min(threads, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    _zaxpy_kernel(
        theta.detach().numpy(),
        full_cols,
        row_offset,
        col_offset,
        np.uint64(where.key),
        np.asarray(seeds, dtype=np.uint64),
        np.asarray(restore, dtype=np.float64).astype(np.float32),
        np.asarray(update, dtype=np.float64).astype(np.float32),
        np.float32(decay),
        kind is ZKind.GAUSSIAN,
    )
