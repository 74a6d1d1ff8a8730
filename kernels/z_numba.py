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


# -- Gaussian z: Box–Muller in float64 with our own libm-grade log, sin and cos, written so that LLVM vectorises
# them (a call to libm in a loop does not vectorise, and the transform then costs ~40x a copy of the weights).
# fdlibm's algorithms (Sun Microsystems, 1993; as in FreeBSD's msun): log with < 1 ulp error, sin and cos of an
# argument reduced by π/2 in two parts, with < 1 ulp error. Results may differ from another libm in the last float64
# bit, which the rounding to fp32 hides but for values within that bit of an fp32 rounding boundary (stream.py).

_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_S1 = -1.66666666666666324348e-01
_S2 = 8.33333333332248946124e-03
_S3 = -1.98412698298579493134e-04
_S4 = 2.75573137070700676789e-06
_S5 = -2.50507602534068634195e-08
_S6 = 1.58969099521155010221e-10
_C1 = 4.16666666666666019037e-02
_C2 = -1.38888888888741095749e-03
_C3 = 2.48015872894767294178e-05
_C4 = -2.75573143513906633035e-07
_C5 = 2.08757232129817482790e-09
_C6 = -1.13596475577881948265e-11
_INV_PIO2 = 6.36619772367581382433e-01
_PIO2_1 = 1.57079632673412561417e+00  # the first 33 bits of π/2: n·_PIO2_1 is exact for small n
_PIO2_1T = 6.07710050650619224932e-11  # π/2 - _PIO2_1
_MANT = np.uint64((1 << 52) - 1)
_TWO52 = 4503599627370496.0  # 2^52: an integer e < 2^52 is the double with bits (bits(2^52) | e), minus 2^52
_TWO52_BITS = np.uint64(0x4330000000000000)


# The loops below use only operations AVX2 has for 4 doubles at once (unsigned shifts, bitwise ops, float
# arithmetic, sqrt, floor, selects): no int64 <-> double conversion and no arithmetic shift, which it lacks and
# which would turn a loop back into scalar code.


@numba.njit(cache=True, error_model="numpy")
def _radii(bits, scratch, out):  # pragma: no cover - compiled
    """out[q] = sqrt(-2·ln u[q]) for u in (0, 1), all normal, given as their bits: fdlibm's log."""
    mant = scratch[0].view(np.uint64)
    expo = scratch[1].view(np.uint64)
    for q in range(bits.shape[0]):  # u = 2^k·m with m in [sqrt(2)/2, sqrt(2)): m's bits and k + 1023 + 2^52
        hx = bits[q]
        m = hx & _MANT
        i = ((m >> _S32) + np.uint64(0x95F64)) & np.uint64(0x100000)
        mant[q] = m | ((i ^ np.uint64(0x3FF00000)) << _S32)
        expo[q] = _TWO52_BITS | ((hx >> np.uint64(52)) + (i >> np.uint64(20)))
    m_values = scratch[0]
    k_values = scratch[1]
    for q in range(bits.shape[0]):
        f = m_values[q] - 1.0
        dk = (k_values[q] - _TWO52) - 1023.0
        hx = (mant[q] >> _S32) & np.uint64(0xFFFFF)
        s = f / (2.0 + f)
        z = s * s
        w = z * z
        t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
        t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
        r = t2 + t1
        hfsq = 0.5 * f * f
        # fdlibm's choice of formula: (hx - 0x6147a) | (0x6b851 - hx) > 0 as signed 32-bit, i.e. hx outside
        # [0x6147a, 0x6b851]
        big = (hx < np.uint64(0x6147A)) | (hx > np.uint64(0x6B851))
        log_big = dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)
        log_small = dk * _LN2_HI - ((s * (f - r) - dk * _LN2_LO) - f)
        out[q] = math.sqrt(-2.0 * (log_big if big else log_small))


@numba.njit(cache=True, error_model="numpy")
def _sincos(u, sin_out, cos_out):  # pragma: no cover - compiled
    """sin and cos of x = 2π·u[q] (x in [0, 2π)): reduced by π/2 in two parts (fdlibm's medium case, ample for
    |x| < 2π but within ~1e-9 of a multiple of π/2), then fdlibm's kernels, then the quadrant's signs."""
    for q in range(u.shape[0]):
        x = TWO_PI * u[q]
        fn = math.floor(x * _INV_PIO2 + 0.5)
        r = x - fn * _PIO2_1
        w = fn * _PIO2_1T
        y0 = r - w
        y1 = (r - y0) - w
        z = y0 * y0
        v = z * y0
        sr = _S2 + z * (_S3 + z * (_S4 + z * (_S5 + z * _S6)))
        sin_r = y0 - ((z * (0.5 * y1 - v * sr) - y1) - v * _S1)
        ww = z * z
        cr = z * (_C1 + z * (_C2 + z * _C3)) + ww * ww * (_C4 + z * (_C5 + z * _C6))
        hz = 0.5 * z
        one_hz = 1.0 - hz
        cos_r = one_hz + (((1.0 - one_hz) - hz) + (z * cr - y0 * y1))
        quadrant = fn - 4.0 * math.floor(fn * 0.25)  # fn mod 4, in floats
        swap = (quadrant == 1.0) | (quadrant == 3.0)
        s_val = cos_r if swap else sin_r
        c_val = sin_r if swap else cos_r
        sin_out[q] = -s_val if quadrant >= 2.0 else s_val
        cos_out[q] = -c_val if (quadrant == 1.0) | (quadrant == 2.0) else c_val


@numba.njit(cache=True, error_model="numpy")
def _fill_gaussian(seed, key, start, n, z):  # pragma: no cover - compiled
    """z[j] = z(start + j) for j < n, Gaussian z of stream version 1 (lanes 0, 1 from (u0, u1); 2, 3 from (u2, u3)):
    Philox for every group first, then the transform over all of them, in loops that vectorise."""
    s0, s1 = seed & _MASK, seed >> _S32
    k2, k3 = key & _MASK, key >> _S32
    first = np.int64(start & np.uint64(3))
    groups = (first + n + 3) >> 2
    g0 = start >> np.uint64(2)
    u = np.empty((4, groups), dtype=np.float64)
    for q in range(groups):
        g = g0 + np.uint64(q)
        w0, w1, w2, w3 = _philox(g & _MASK, g >> _S32, k2, k3, s0, s1)
        u[0, q] = _uniform(w0)
        u[1, q] = _uniform(w1)
        u[2, q] = _uniform(w2)
        u[3, q] = _uniform(w3)
    scratch = np.empty((2, groups), dtype=np.float64)
    out = np.empty((6, groups), dtype=np.float64)  # r01, r23, sin01, cos01, sin23, cos23
    _radii(u[0].view(np.uint64), scratch, out[0])
    _radii(u[2].view(np.uint64), scratch, out[1])
    _sincos(u[1], out[2], out[3])
    _sincos(u[3], out[4], out[5])
    full = np.empty(4 * groups, dtype=np.float32)
    for q in range(groups):
        full[4 * q] = np.float32(out[0, q] * out[3, q])
        full[4 * q + 1] = np.float32(out[0, q] * out[2, q])
        full[4 * q + 2] = np.float32(out[1, q] * out[5, q])
        full[4 * q + 3] = np.float32(out[1, q] * out[4, q])
    for j in range(n):
        z[j] = full[first + j]


@numba.njit(cache=True, inline="always")
def _signs(w, bits, at):  # pragma: no cover - compiled
    """z[at + b] = +1.0f if bit b of word w is 0 else -1.0f, for b < 32, written as float32 bits (1.0f with bit b as
    its sign bit): 32-bit shifts and ors, 8 lanes at a time on AVX2."""
    w32 = np.uint32(w)
    for b in range(32):
        bits[at + b] = np.uint32(0x3F800000) | (((w32 >> np.uint32(b)) & np.uint32(1)) << np.uint32(31))


@numba.njit(cache=True, error_model="numpy")
def _fill_rademacher(seed, key, start, n, z):  # pragma: no cover - compiled
    """z[j] = z(start + j) for j < n, Rademacher z of stream version 1: bit (i & 31) of word ((i >> 5) & 3) of
    group i >> 7, +1 for 0 and -1 for 1."""
    s0, s1 = seed & _MASK, seed >> _S32
    k2, k3 = key & _MASK, key >> _S32
    bits = z.view(np.uint32)
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
            _signs(w0, bits, base)
            _signs(w1, bits, base + 32)
            _signs(w2, bits, base + 64)
            _signs(w3, bits, base + 96)
            continue
        for e in range(lo, hi):
            word = e >> 5
            w = w0 if word == 0 else (w1 if word == 1 else (w2 if word == 2 else w3))
            z[base + e] = np.float32(1 - 2 * np.int64((w >> np.uint64(e & 31)) & _ONE))


@numba.njit(cache=True, error_model="numpy")
def _tile(row, start, seeds, key, restore, update, decay, gaussian):  # pragma: no cover - compiled
    """One tile: row[j] ← (row[j] + Σ_k restore[k]·z_k(start + j))·decay + Σ_k update[k]·z_k(start + j).

    Compiled on its own, not inside the parallel loop: numba's parallel lowering hands the loop body arrays of
    unknown layout, and these loops then do not vectorise (measured: 2x slower per element)."""
    n = row.shape[0]
    # a zero coefficient adds +0 or -0 to an accumulator that is never -0: skipping it changes no bit
    last = -1
    active = 0
    for k in range(seeds.shape[0]):
        if restore[k] != 0 or update[k] != 0:
            last = k
            active += 1
    z = np.empty(n, dtype=np.float32)
    # accumulators only when two or more terms meet (a probe move, a commit): a single term adds to 0 in a
    # register, the same rounding without reading two buffers
    racc = np.zeros(n if active > 1 else 0, dtype=np.float32)
    uacc = np.zeros(n if active > 1 else 0, dtype=np.float32)
    zero = np.float32(0)
    for k in range(last + 1):
        a, b = restore[k], update[k]
        if a == 0 and b == 0:
            continue
        if gaussian:
            _fill_gaussian(seeds[k], key, start, n, z)
        else:
            _fill_rademacher(seeds[k], key, start, n, z)
        if k < last:
            for j in range(n):
                racc[j] += a * z[j]
                uacc[j] += b * z[j]
        elif active == 1:  # the only term, fused with the write
            for j in range(n):
                row[j] = (row[j] + (zero + a * z[j])) * decay + (zero + b * z[j])
        else:  # the last term, fused with the write: the same roundings in the same order, one loop fewer
            for j in range(n):
                row[j] = (row[j] + (racc[j] + a * z[j])) * decay + (uacc[j] + b * z[j])
    if last < 0:
        for j in range(n):
            row[j] = (row[j] + zero) * decay + zero


@numba.njit(cache=True, parallel=True, error_model="numpy")
def _zaxpy_kernel(theta, full_cols, row_offset, col_offset, key, seeds, restore, update, decay,
                  gaussian):  # pragma: no cover - compiled
    rows, cols = theta.shape
    tiles_per_row = (cols + TILE - 1) // TILE
    for t in numba.prange(rows * tiles_per_row):
        r = t // tiles_per_row
        c0 = (t % tiles_per_row) * TILE
        n = min(TILE, cols - c0)
        start = np.uint64((row_offset + r) * full_cols + col_offset + c0)
        _tile(theta[r, c0 : c0 + n], start, seeds, key, restore, update, decay, gaussian)


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
