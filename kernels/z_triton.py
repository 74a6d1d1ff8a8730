"""Triton kernels for z (stream version 1, see :mod:`sglang_mezo.kernels.stream`). Kernels only: launchers live in
:mod:`sglang_mezo.kernels.ops`.

**One Philox call per group, not per element.** A program covers whole Philox groups of one run of full-tensor
indices (128 elements a group for Rademacher, 4 for Gaussian), computes each group's four words once, and expands
them into the elements it covers: 128 signs, or two Box–Muller pairs (one log, one sqrt and one shared sin/cos
reduction per pair). A group that straddles the start or end of a run (a TP shard's edge, an unaligned offset) is
computed by the programs on both sides and masked: at most one spare group per run edge.

**The same float64 transform as the CPU kernel** (:mod:`.z_numba`): fdlibm's log and sin/cos, operation for
operation, compiled without FMA contraction. Every operation is an IEEE float64 add, multiply, divide or sqrt, so a
GPU, Triton's interpreter and the numba kernel compute the same float64 bits, and the same fp32 z.

**One launch per pass, not per tensor.** A pass over a model's 201 tensors would otherwise cost 201 launches of host
time, more than a small tensor's pass costs the GPU. The launcher writes a table of the blocks (offsets from one base
pointer, strides, row lengths, keys) and a map from program to table row, once per set of blocks (cached), and each
program reads its row.

**Integer arguments may arrive as constants.** Triton specialises an integer argument equal to 1 into a compile-time
constant (triton-lang/triton#2939): a plain Python int inside the kernel, with no ``.to``. The one integer argument
left (the seed count) is widened with ``tl.cast``, which takes a constant too; the blocks' integers come from the
table at run time. ``tests/test_cuda_compile.py`` compiles the launches the launcher makes for sm_90 and sm_80.

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

# fdlibm's constants (Sun Microsystems, 1993), as in kernels/z_numba.py: log's, then sin's and cos's kernels, then
# the reduction by π/2 in two parts.
LN2_HI: tl.constexpr = tl.constexpr(6.93147180369123816490e-01)
LN2_LO: tl.constexpr = tl.constexpr(1.90821492927058770002e-10)
LG1: tl.constexpr = tl.constexpr(6.666666666666735130e-01)
LG2: tl.constexpr = tl.constexpr(3.999999999940941908e-01)
LG3: tl.constexpr = tl.constexpr(2.857142874366239149e-01)
LG4: tl.constexpr = tl.constexpr(2.222219843214978396e-01)
LG5: tl.constexpr = tl.constexpr(1.818357216161805012e-01)
LG6: tl.constexpr = tl.constexpr(1.531383769920937332e-01)
LG7: tl.constexpr = tl.constexpr(1.479819860511658591e-01)
S1: tl.constexpr = tl.constexpr(-1.66666666666666324348e-01)
S2: tl.constexpr = tl.constexpr(8.33333333332248946124e-03)
S3: tl.constexpr = tl.constexpr(-1.98412698298579493134e-04)
S4: tl.constexpr = tl.constexpr(2.75573137070700676789e-06)
S5: tl.constexpr = tl.constexpr(-2.50507602534068634195e-08)
S6: tl.constexpr = tl.constexpr(1.58969099521155010221e-10)
C1: tl.constexpr = tl.constexpr(4.16666666666666019037e-02)
C2: tl.constexpr = tl.constexpr(-1.38888888888741095749e-03)
C3: tl.constexpr = tl.constexpr(2.48015872894767294178e-05)
C4: tl.constexpr = tl.constexpr(-2.75573143513906633035e-07)
C5: tl.constexpr = tl.constexpr(2.08757232129817482790e-09)
C6: tl.constexpr = tl.constexpr(-1.13596475577881948265e-11)
INV_PIO2: tl.constexpr = tl.constexpr(6.36619772367581382433e-01)
PIO2_1: tl.constexpr = tl.constexpr(1.57079632673412561417e00)  # the first 33 bits of π/2: n·PIO2_1 is exact
PIO2_1T: tl.constexpr = tl.constexpr(6.07710050650619224932e-11)  # π/2 - PIO2_1


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
def philox_words(seed, key, group):
    """The four uint32 words of counter (group lo, group hi, key lo, key hi) under key (seed lo, seed hi).

    seed, key -- int64 scalars in [0, 2^63); group -- an int64 block of group numbers."""
    g_lo = (group & 0xFFFFFFFF).to(tl.uint32)
    g_hi = (group >> 32).to(tl.uint32)
    k_lo = tl.zeros_like(g_lo) + (key & 0xFFFFFFFF).to(tl.uint32)
    k_hi = tl.zeros_like(g_lo) + (key >> 32).to(tl.uint32)
    return philox4x32_10(g_lo, g_hi, k_lo, k_hi, (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32))


@triton.jit
def uniform(w):
    """A uint32 word -> its float64 uniform (w + 0.5)·2^-32 in (0, 1), exact."""
    return (w.to(tl.float64) + 0.5) * UNIFORM_SCALE


@triton.jit
def box_muller_radius(u):
    """sqrt(-2·ln u) for float64 u in (0, 1): fdlibm's log, every operation as in ``z_numba._radii``."""
    hx = u.to(tl.int64, bitcast=True)  # u > 0: the sign bit is clear, so int64 shifts are logical
    mantissa = hx & 0xFFFFFFFFFFFFF
    # u = 2^k·m with m in [sqrt(2)/2, sqrt(2)): m's bits, and k's biased exponent
    i = ((mantissa >> 32) + 0x95F64) & 0x100000
    m_bits = mantissa | ((i ^ 0x3FF00000) << 32)
    f = m_bits.to(tl.float64, bitcast=True) - 1.0
    dk = ((hx >> 52) + (i >> 20)).to(tl.float64) - 1023.0
    high = (m_bits >> 32) & 0xFFFFF
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (LG2 + w * (LG4 + w * LG6))
    t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    big = (high < 0x6147A) | (high > 0x6B851)
    log_big = dk * LN2_HI - ((hfsq - (s * (hfsq + r) + dk * LN2_LO)) - f)
    log_small = dk * LN2_HI - ((s * (f - r) - dk * LN2_LO) - f)
    return tl.sqrt(-2.0 * tl.where(big, log_big, log_small))  # IEEE-rounded (sqrt.rn.f64)


@triton.jit
def box_muller_phase(u):
    """(sin x, cos x) of x = 2π·u for float64 u in (0, 1), from one reduction by π/2: every operation as in
    ``z_numba._sincos`` (fdlibm's medium-case reduction and its sin and cos kernels)."""
    x = TWO_PI * u
    fn = tl.floor(x * INV_PIO2 + 0.5)
    r = x - fn * PIO2_1
    w = fn * PIO2_1T
    y0 = r - w
    y1 = (r - y0) - w
    z = y0 * y0
    v = z * y0
    sr = S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)))
    sin_r = y0 - ((z * (0.5 * y1 - v * sr) - y1) - v * S1)
    ww = z * z
    cr = z * (C1 + z * (C2 + z * C3)) + ww * ww * (C4 + z * (C5 + z * C6))
    hz = 0.5 * z
    one_hz = 1.0 - hz
    cos_r = one_hz + (((1.0 - one_hz) - hz) + (z * cr - y0 * y1))
    quadrant = fn - 4.0 * tl.floor(fn * 0.25)  # fn mod 4, in floats
    swap = (quadrant == 1.0) | (quadrant == 3.0)
    s_val = tl.where(swap, cos_r, sin_r)
    c_val = tl.where(swap, sin_r, cos_r)
    sin_x = tl.where(quadrant >= 2.0, -s_val, s_val)
    cos_x = tl.where((quadrant == 1.0) | (quadrant == 2.0), -c_val, c_val)
    return sin_x, cos_x


@triton.jit
def gaussian_groups(seed, key, group):
    """[GROUPS, 4] fp32 normals of the groups ``group`` (int64 [GROUPS]), lanes in stream order: lanes 0 and 1 are
    r·cos φ and r·sin φ of (u0, u1), lanes 2 and 3 the same of (u2, u3); float64 math, rounded once."""
    w0, w1, w2, w3 = philox_words(seed, key, group)
    r01 = box_muller_radius(uniform(w0))
    r23 = box_muller_radius(uniform(w2))
    sin01, cos01 = box_muller_phase(uniform(w1))
    sin23, cos23 = box_muller_phase(uniform(w3))
    n0 = (r01 * cos01).to(tl.float32)
    n1 = (r01 * sin01).to(tl.float32)
    n2 = (r23 * cos23).to(tl.float32)
    n3 = (r23 * sin23).to(tl.float32)
    # join puts its new axis last: [g, b, a] = (n0, n2 | n1, n3)[a][b], so [g, 2b + a] runs n0, n1, n2, n3
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (group.shape[0], 4))


@triton.jit
def rademacher_groups(seed, key, group):
    """[4, GROUPS, 32] fp32 signs of the groups ``group`` (int64 [GROUPS]): element (q, g, b) is element
    32·q + b of group g, bit b of word q, +1 for 0 and -1 for 1.

    Laid out word-major so that Triton's default layout puts the warps along the groups and repeats each thread
    over the words: a thread then holds elements of few groups and makes one Philox call per group, also inside
    the seed loop (where the layout is not taken from the loads)."""
    w0, w1, w2, w3 = philox_words(seed, key, group)
    q = tl.arange(0, 4)[:, None, None]
    w = tl.where(q == 0, w0[None, :, None], tl.where(q == 1, w1[None, :, None], tl.where(q == 2, w2[None, :, None],
                                                                                         w3[None, :, None])))
    bit = (w >> tl.arange(0, 32)[None, None, :].to(tl.uint32)) & 1
    return 1.0 - 2.0 * bit.to(tl.float32)


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


# One row of the block table (int64): where a block is and how its programs map onto it.
THETA_OFFSET: tl.constexpr = tl.constexpr(0)  # elements from theta_base to the block's element (0, 0)
OUT_OFFSET: tl.constexpr = tl.constexpr(1)  # elements from out_base to the served copy's element (0, 0)
ROW_STRIDE: tl.constexpr = tl.constexpr(2)  # elements between the block's rows
OUT_ROW_STRIDE: tl.constexpr = tl.constexpr(3)  # elements between the served copy's rows
COLS: tl.constexpr = tl.constexpr(4)  # row length
FIRST_INDEX: tl.constexpr = tl.constexpr(5)  # full-tensor index of element (0, 0): z is keyed by it
INDEX_ROW_STRIDE: tl.constexpr = tl.constexpr(6)  # full-index distance between rows (the full tensor's row length)
PROGRAMS_PER_ROW: tl.constexpr = tl.constexpr(7)  # programs per row of this block
KEY: tl.constexpr = tl.constexpr(8)  # the tensor's 63-bit identity
FIRST_PROGRAM: tl.constexpr = tl.constexpr(9)  # the program id of the block's first program
DECAYED: tl.constexpr = tl.constexpr(10)  # 1: multiply by decay; 0: by 1 (biases, norms)
FIELDS: tl.constexpr = tl.constexpr(11)


@triton.jit
def zaxpy_kernel(
    theta_base,
    out_base,
    table_ptr,
    program_block_ptr,
    seeds_ptr,
    restore_ptr,
    update_ptr,
    n_seeds,
    decay,
    KIND: tl.constexpr,
    GROUPS: tl.constexpr,
    VECTOR: tl.constexpr,
    HAS_OUT: tl.constexpr,
    WRITE_BACK: tl.constexpr,
):
    """theta ← (theta + Σ_k restore[k]·z_k)·d + Σ_k update[k]·z_k, in place, in fp32, for every block of a table:
    a whole pass over many tensors in one launch (a launch per tensor costs more host time than a small tensor's
    pass costs the GPU).

    With ``HAS_OUT`` the result is also written, rounded to its dtype, to each block's served copy: theta is then
    an fp32 master and out the weights served from it; a probe leaves the master as it is (``WRITE_BACK`` off), a
    commit writes both in the same read.

    theta_base, out_base -- any block of the launch, and its served copy (``out_base`` = ``theta_base`` without
                            ``HAS_OUT``): every block is addressed as an element offset from them
    table_ptr            -- int64[blocks, FIELDS]: the rows described above
    program_block_ptr    -- int32[programs]: the table row of each program
    seeds_ptr            -- int64[n_seeds]; restore_ptr, update_ptr -- fp32[n_seeds] coefficients
    decay                -- fp32 multiplier of the restored weights of decayed blocks (1 - lr·wd)
    KIND                 -- 0 gaussian (4 elements a group), 1 rademacher (128 elements a group)
    GROUPS               -- Philox groups a program covers (a power of 2)
    VECTOR               -- every block starts on a group boundary, and its offsets, strides and row length are
                            multiples of 16 (the launcher checks): unmasked starts and 16-byte accesses
    """
    n_seeds = tl.cast(n_seeds, tl.int32)  # an integer argument may arrive as int32 or as the constant 1
    LOG2: tl.constexpr = 2 if KIND == 0 else 7
    PER_GROUP: tl.constexpr = 1 << LOG2
    pid = tl.program_id(0)
    row_ptr = table_ptr + tl.load(program_block_ptr + pid).to(tl.int64) * FIELDS
    theta_offset = tl.load(row_ptr + THETA_OFFSET)
    out_offset = tl.load(row_ptr + OUT_OFFSET)
    row_stride = tl.load(row_ptr + ROW_STRIDE)
    out_row_stride = tl.load(row_ptr + OUT_ROW_STRIDE)
    cols = tl.load(row_ptr + COLS)
    first_index = tl.load(row_ptr + FIRST_INDEX)
    index_row_stride = tl.load(row_ptr + INDEX_ROW_STRIDE)
    programs_per_row = tl.load(row_ptr + PROGRAMS_PER_ROW)
    key = tl.load(row_ptr + KEY)
    local = pid.to(tl.int64) - tl.load(row_ptr + FIRST_PROGRAM)
    block_decay = tl.where(tl.load(row_ptr + DECAYED) != 0, decay, 1.0)
    if VECTOR:
        theta_offset = tl.multiple_of(theta_offset, 16)
        out_offset = tl.multiple_of(out_offset, 16)
        row_stride = tl.multiple_of(row_stride, 16)
        out_row_stride = tl.multiple_of(out_row_stride, 16)
        cols = tl.multiple_of(cols, 16)

    row = local // programs_per_row
    part = local - row * programs_per_row
    run_start = first_index + row * index_row_stride  # full index of the row's first element
    first_group = (run_start >> LOG2) + part * GROUPS
    group = first_group + tl.arange(0, GROUPS)
    # each element's column within the program's first group: [GROUPS, 4] for Gaussian z (group, lane), [4,
    # GROUPS, 32] for Rademacher z (word, group, bit: see rademacher_groups)
    if KIND == 0:
        offsets = tl.arange(0, GROUPS)[:, None] * PER_GROUP + tl.arange(0, 4)[None, :]
    else:
        offsets = (tl.arange(0, 4)[:, None, None] * 32 + tl.arange(0, GROUPS)[None, :, None] * PER_GROUP
                   + tl.arange(0, 32)[None, None, :])
    if VECTOR:
        column = part * (GROUPS * PER_GROUP) + offsets
        mask = column < cols
    else:
        column = (first_group << LOG2) - run_start + offsets
        mask = (column >= 0) & (column < cols)
    theta_ptrs = theta_base + theta_offset + row * row_stride + column
    theta = tl.load(theta_ptrs, mask=mask, other=0.0).to(tl.float32)

    restore_acc = tl.zeros(offsets.shape, dtype=tl.float32)
    update_acc = tl.zeros(offsets.shape, dtype=tl.float32)
    for k in range(n_seeds):  # a loop, not unrolled: one compiled kernel for any number of probes
        a = tl.load(restore_ptr + k)
        b = tl.load(update_ptr + k)
        if (a != 0.0) | (b != 0.0):  # a zero term adds +0 to accumulators that are never -0: no bit changes
            seed = tl.load(seeds_ptr + k)
            if KIND == 0:
                z = gaussian_groups(seed, key, group)
            else:
                z = rademacher_groups(seed, key, group)
            restore_acc += a * z
            update_acc += b * z
    theta = (theta + restore_acc) * block_decay + update_acc
    if WRITE_BACK:
        tl.store(theta_ptrs, rounded(theta, theta_base.dtype.element_ty), mask=mask)
    if HAS_OUT:
        out_ptrs = out_base + out_offset + row * out_row_stride + column
        tl.store(out_ptrs, rounded(theta, out_base.dtype.element_ty), mask=mask)
