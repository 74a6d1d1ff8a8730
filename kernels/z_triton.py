"""Triton kernels for z (stream version 1, see :mod:`sglang_mezo.kernels.stream`). Kernels only: launchers live in
:mod:`sglang_mezo.kernels.ops`.

Hazard: these kernels update their input *in place*. Never wrap them in ``triton.autotune`` without
``restore_value``: autotuning runs the kernel once per candidate config, and the perturbation or update would
be applied that many times. Block size and warps are fixed by the launcher.
"""

import triton
import triton.language as tl

PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
TWO_PI: tl.constexpr = tl.constexpr(6.283185307179586)
UNIFORM_SCALE: tl.constexpr = tl.constexpr(2.3283064365386963e-10)  # 2^-32


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks: counter (c0, c1, c2, c3), key (k0, k1); returns the four output words."""
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(PHILOX_M1, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(PHILOX_M0, _c0) ^ c3 ^ k1
        c1 = PHILOX_M1 * _c2
        c3 = PHILOX_M0 * _c0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def z_at(seed, key, index, KIND: tl.constexpr):
    """z(seed, key, index) in fp32 for a block of int64 full-tensor indices; KIND 0 = gaussian, 1 = rademacher.

    Every element computes the Philox call of its own group (4 elements share one for gaussian, 128 for
    rademacher), so a block may start anywhere in the full tensor (TP shards, padded vocabularies).
    """
    seed = seed.to(tl.int64)  # a small scalar argument arrives as int32: widen before masking
    key = key.to(tl.int64)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = (seed >> 32).to(tl.uint32)
    key_lo = (key & 0xFFFFFFFF).to(tl.uint32)
    key_hi = (key >> 32).to(tl.uint32)
    if KIND == 0:
        group = index >> 2
    else:
        group = index >> 7
    g_lo = (group & 0xFFFFFFFF).to(tl.uint32)
    g_hi = (group >> 32).to(tl.uint32)
    k_lo = tl.zeros_like(g_lo) + key_lo
    k_hi = tl.zeros_like(g_lo) + key_hi
    w0, w1, w2, w3 = philox4x32_10(g_lo, g_hi, k_lo, k_hi, seed_lo, seed_hi)
    if KIND == 0:
        lane = index & 3
        w_radius = tl.where(lane < 2, w0, w2)
        w_phase = tl.where(lane < 2, w1, w3)
        # Box–Muller in float64, rounded once: see kernels/stream.py for why.
        u_radius = (w_radius.to(tl.float64) + 0.5) * UNIFORM_SCALE
        u_phase = (w_phase.to(tl.float64) + 0.5) * UNIFORM_SCALE
        radius = tl.sqrt(-2.0 * tl.log(u_radius))  # fp64 sqrt is IEEE-rounded (sqrt.rn.f64)
        phase = TWO_PI * u_phase
        z = tl.where((lane & 1) == 0, radius * tl.cos(phase), radius * tl.sin(phase)).to(tl.float32)
    else:
        word = (index >> 5) & 3
        w = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
        bit = (w >> (index & 31).to(tl.uint32)) & 1
        z = 1.0 - 2.0 * bit.to(tl.float32)
    return z


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """fp32 ``x`` in ``dtype``, rounded to nearest even. For bf16 that is spelled out on the bits: a GPU's convert
    does the same, but Triton's interpreter truncates, and the tests compare the two paths bit for bit. (Finite
    values only; MeZO refuses non-finite updates before they reach the weights.)"""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def zaxpy_kernel(
    theta_ptr,
    n_rows,
    n_cols,
    row_stride,
    full_cols,
    row_offset,
    col_offset,
    key,
    seeds_ptr,
    restore_ptr,
    update_ptr,
    decay,
    out_ptr,
    out_row_stride,
    N_SEEDS: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_OUT: tl.constexpr,
    WRITE_BACK: tl.constexpr,
):
    """theta ← (theta + Σ_k restore[k]·z_k)·decay + Σ_k update[k]·z_k, in place, in fp32.

    With ``HAS_OUT`` the result is also written, rounded to its dtype, to ``out_ptr`` (a block of the same shape,
    ``out_row_stride`` between rows): theta is then an fp32 master and out the weights served from it; a probe
    leaves the master as it is (``WRITE_BACK`` off), a commit writes both in the same read.

    theta_ptr   -- [n_rows, n_cols] block, unit stride along columns, ``row_stride`` between rows; any float dtype
    full_cols   -- row length of the full (unsharded) tensor viewed as 2-D
    row_offset, col_offset -- where this block sits in the full tensor: element (r, c) has full index
                   (row_offset + r) * full_cols + col_offset + c, which is what z is keyed by
    key         -- the tensor's 63-bit identity (int64)
    seeds_ptr   -- int64[N_SEEDS]; restore_ptr, update_ptr -- fp32[N_SEEDS] coefficients
    decay       -- fp32 multiplier of the restored weights (1 - lr·wd, or 1 for undecayed tensors)
    """
    pid = tl.program_id(0).to(tl.int64)
    local = pid * BLOCK + tl.arange(0, BLOCK)
    n_cols = n_cols.to(tl.int64)  # scalars below 2^31 arrive as int32: rows * cols may not fit
    mask = local < n_rows.to(tl.int64) * n_cols
    r = local // n_cols
    c = local - r * n_cols
    index = (row_offset + r) * full_cols + col_offset + c
    ptrs = theta_ptr + r * row_stride + c
    theta = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    restore_acc = tl.zeros([BLOCK], dtype=tl.float32)
    update_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(N_SEEDS):
        z = z_at(tl.load(seeds_ptr + k), key, index, KIND)
        restore_acc += tl.load(restore_ptr + k) * z
        update_acc += tl.load(update_ptr + k) * z
    theta = (theta + restore_acc) * decay + update_acc
    if WRITE_BACK:
        tl.store(ptrs, rounded(theta, theta_ptr.dtype.element_ty), mask=mask)
    if HAS_OUT:
        tl.store(out_ptr + r * out_row_stride + c, rounded(theta, out_ptr.dtype.element_ty), mask=mask)
