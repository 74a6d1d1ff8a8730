"""In-place z kernels: TP shards see the full tensor's z, Triton equals the PyTorch path, the fused update equals
the unfused sequence, the fp32 round trip comes back, and a pass allocates no parameter-sized temporary."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import assert_close_report

from sglang_mezo.kernels import PassTargets, ZKind, ZSlice, ZTarget, materialize_z, tensor_key, zaxpy_
from sglang_mezo.kernels.z_numba import zaxpy_numba_
from sglang_mezo.kernels.z_torch import zaxpy_torch_

KEY = tensor_key("model.layers.0.self_attn.o_proj.weight")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


PATHS = {"cpu": {}, "triton": {"device": DEVICE, "force_triton": True}}
"""The CPU kernels, and the Triton kernel: compiled on CUDA when a GPU is present, Triton's interpreter otherwise."""


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", list(ZKind))
@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("shape", [(12, 131), (1, 4099), (36, 4), (1, 1), (7, 1), (1, 130)])
def test_shards_see_the_full_tensor_z(path, kind, shards, shape):
    """Column-parallel (split rows), row-parallel (split columns) and 1-D (vocab-like) shards, awkward shapes,
    one-row blocks (a norm's gain) and one-column ones, on every path."""
    rows, cols = shape
    options = PATHS[path]
    full = materialize_z(11, ZSlice(KEY, cols), shape, kind)  # the CPU path's whole tensor: the reference
    row_cuts = torch.linspace(0, rows, shards + 1).round().long().tolist()
    col_cuts = torch.linspace(0, cols, shards + 1).round().long().tolist()
    for r0, r1 in zip(row_cuts, row_cuts[1:]):
        part = materialize_z(11, ZSlice(KEY, cols, row_offset=r0), (r1 - r0, cols), kind, **options).cpu()
        assert torch.equal(part, full[r0:r1]), (r0, r1)
    for c0, c1 in zip(col_cuts, col_cuts[1:]):
        part = materialize_z(11, ZSlice(KEY, cols, col_offset=c0), (rows, c1 - c0), kind, **options).cpu()
        assert torch.equal(part, full[:, c0:c1]), (c0, c1)


def test_shard_in_a_fused_and_strided_view():
    """A piece of a fused tensor (a row block of qkv) shifted into its own tensor's coordinates."""
    fused = torch.zeros(10, 16)
    q = fused[0:6]  # q rows of a fused qkv: rows 0..5 of q_proj
    zaxpy_([ZTarget(q, ZSlice(KEY, 16))], [5], [1.0])
    assert torch.equal(fused[0:6], materialize_z(5, ZSlice(KEY, 16), (6, 16)))
    assert torch.count_nonzero(fused[6:]) == 0
    wide = torch.zeros(6, 32)
    left = wide[:, :16]  # non-contiguous: unit column stride, row stride 32
    zaxpy_([ZTarget(left, ZSlice(KEY, 16))], [5], [1.0])
    assert torch.equal(wide[:, :16], materialize_z(5, ZSlice(KEY, 16), (6, 16)))
    assert torch.count_nonzero(wide[:, 16:]) == 0


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("kind", list(ZKind))
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_torch_path(kind, dtype):
    """The Triton kernel (compiled on CUDA, interpreted on CPU) against the PyTorch path, on a shard, with
    several seeds, restore and update coefficients and decay: the pass every MeZO step ends with."""
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(37, 61, generator=gen) * 0.02).to(dtype)
    where = ZSlice(KEY, 200, row_offset=3, col_offset=101)
    seeds, restore, update = [3, 2**33 + 1, 9], [0.0, 0.0, 1e-3], [-2e-4, 5e-5, 1e-4]

    cpu = base.clone()
    zaxpy_([ZTarget(cpu, where)], seeds, restore, update, decay=0.999, kind=kind)
    tri = base.clone().to(DEVICE)
    zaxpy_([ZTarget(tri, where)], seeds, restore, update, decay=0.999, kind=kind, force_triton=True)
    tri = tri.cpu()
    assert not torch.equal(cpu, base)
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        # Triton's interpreter casts fp32 -> bf16 by truncation (triton/runtime/interpreter.py, cast_impl); torch and
        # CUDA's cvt.rn round to nearest even. One bf16 ulp apart at most, never more.
        assert_close_report(tri, cpu, atol=0, rtol=2**-7, what="triton (interpreter) vs torch, bf16")
    else:
        # same z, same operation order, FMA contraction off (enable_fp_fusion=False): identical
        assert torch.equal(tri, cpu)


def _mixed_blocks(device: str, dtype: torch.dtype, masters: bool) -> PassTargets:
    """A pass's worth of awkward blocks: a gain, a one-column shard, a short bias, unaligned rows of a slice, a
    block wider than a tile, a square matrix; decayed and not; on ``device``, with fp32 masters or without."""
    gen = torch.Generator().manual_seed(4)
    specs = [((1, 576), ZSlice(tensor_key("norm"), 576), False), ((7, 1), ZSlice(KEY, 2, col_offset=1), True),
             ((1, 37), ZSlice(tensor_key("bias"), 37), False), ((9, 61), ZSlice(KEY, 200, 3, 101), True),
             ((2, 2100), ZSlice(tensor_key("wide"), 4200, 0, 2100), True), ((16, 16), ZSlice(KEY, 16), True)]
    targets = []
    for shape, where, decayed in specs:
        storage = (torch.randn(shape[0], shape[1] + 3, generator=gen) * 0.05).to(dtype).to(device)
        block = storage[:, 3:] if shape[0] > 1 and shape[1] == 61 else storage[:, : shape[1]]
        master = block.float().contiguous() if masters else None
        targets.append(ZTarget(block, where, decay=decayed, master=master))
    return PassTargets(targets)


@pytest.mark.parametrize("kind", list(ZKind))
@pytest.mark.parametrize("mode", ["fp32 in place", "bf16 master", "fp16 master"])
def test_one_triton_launch_over_many_blocks_equals_the_cpu_path(kind, mode):
    """A whole pass in one launch (a table of blocks, reused by the next pass): probe, move, commit with decay,
    against the CPU paths over the same blocks, bit for bit."""
    dtype = {"fp32 in place": torch.float32, "bf16 master": torch.bfloat16, "fp16 master": torch.float16}[mode]
    masters = dtype != torch.float32
    results = []
    for device, force in (("cpu", False), (DEVICE, True)):
        targets = _mixed_blocks(device, dtype, masters)
        passes = [([5], [1e-3], [0.0], 1.0, False), ([5, 6], [-1e-3, 1e-3], [0.0, 0.0], 1.0, False),
                  ([5, 6], [0.0, -1e-3], [2e-4, -3e-4], 0.99, True)]
        for seeds, restore, update, decay, commit in passes:
            zaxpy_(targets, seeds, restore, update, decay=decay, kind=kind, commit=commit or not masters,
                   force_triton=force)
        results.append([(t.theta.cpu(), None if t.master is None else t.master.cpu()) for t in targets])
    for (cpu_theta, cpu_master), (tri_theta, tri_master) in zip(*results, strict=True):
        assert torch.equal(cpu_theta, tri_theta)
        assert cpu_master is None or torch.equal(cpu_master, tri_master)


@pytest.mark.parametrize("kind", list(ZKind))
@pytest.mark.parametrize(
    ("shape", "where", "strided"),
    [
        ((37, 61), ZSlice(KEY, 61), False),  # whole tensor: one run
        ((12, 131), ZSlice(KEY, 200, row_offset=3, col_offset=17), False),  # a row-parallel shard's columns
        ((9, 50), ZSlice(KEY, 50, row_offset=2**31 + 7), True),  # rows of a wider storage, a far offset
        ((1, (1 << 20) + 3), ZSlice(KEY, 1 << 21, col_offset=5), False),  # > 1M normals, unaligned start
        ((3, 1), ZSlice(KEY, 1, row_offset=126), True),  # one-element runs across a Rademacher group edge
    ],
)
def test_compiled_cpu_pass_equals_torch_path(kind, shape, where, strided):
    """The numba kernel (what fp32 CPU weights take) against the PyTorch path, bit for bit, on the pass that ends
    every step: several seeds (one with both coefficients zero), restore, update and decay."""
    gen = torch.Generator().manual_seed(3)
    storage = torch.randn(shape[0], shape[1] * (2 if strided else 1), generator=gen) * 0.02
    seeds, restore, update = [3, 2**62 + 5, 8, 77], [0.0, 1e-3, 0.0, -0.5], [-1e-4, 0.0, 0.0, 2e-5]
    expected, got = storage.clone(), storage.clone()
    for out, cpu_pass in ((expected, zaxpy_torch_), (got, zaxpy_numba_)):
        cpu_pass(out[:, : shape[1]], where, seeds=seeds, restore=restore, update=update, decay=0.999, kind=kind)
    assert not torch.equal(got, storage)
    assert torch.equal(got, expected)


def test_triton_z_equals_torch_z_bit_for_bit():
    for kind in ZKind:
        where = ZSlice(KEY, 4099, row_offset=5, col_offset=0)
        a = materialize_z(2**40 + 5, where, (33, 4099), kind)
        b = materialize_z(2**40 + 5, where, (33, 4099), kind, device=DEVICE, force_triton=True).cpu()
        assert torch.equal(a, b), kind


def test_triton_gaussian_z_equals_the_compiled_cpu_kernel_on_a_million_elements():
    """The Triton kernel evaluates the numba kernel's float64 log and sin/cos operation for operation (fdlibm's
    algorithms, no FMA contraction): the same bits on every element, not only up to the stream's rare one-ulp
    boundary case that another libm's transform may hit."""
    n = (1 << 20) + 3
    where = ZSlice(KEY, 1 << 21, col_offset=5)
    cpu = torch.zeros(1, n)
    zaxpy_numba_(cpu, where, seeds=[2**62 + 9], restore=[1.0], update=[0.0], decay=1.0, kind=ZKind.GAUSSIAN)
    tri = materialize_z(2**62 + 9, where, (1, n), ZKind.GAUSSIAN, device=DEVICE, force_triton=True).cpu()
    assert_close_report(tri, cpu, atol=0, rtol=0, what="triton vs numba, gaussian")


@pytest.mark.parametrize("kind", list(ZKind))
def test_fused_update_equals_unfused_sequence(kind):
    """θ ← (θ + ε·z_n)(1 - lr·wd) - lr·Σ g_k z_k / n in one pass, vs. restore, decay and each update separately."""
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(64, 97, generator=gen) * 0.05
    where = ZSlice(KEY, 97)
    seeds, grads, eps, lr, wd = [1, 2, 3], [0.7, -1.3, 0.2], 1e-3, 1e-2, 0.1

    fused = theta.clone()
    zaxpy_([ZTarget(fused, where)], seeds, [0.0, 0.0, eps], [-lr * g / 3 for g in grads], decay=1 - lr * wd,
           kind=kind)

    unfused = theta.clone()
    zaxpy_([ZTarget(unfused, where)], [seeds[-1]], [eps], kind=kind)
    unfused.mul_(1 - lr * wd)
    for s, g in zip(seeds, grads):
        unfused.add_(materialize_z(s, where, unfused.shape, kind), alpha=-lr * g / 3)
    # fp32 rounding happens at the operands' scale (|θ| ~ 0.2 here), not at the scale of a result near zero
    scale = theta.abs().max().item()
    assert_close_report(fused, unfused, atol=2 * torch.finfo(torch.float32).eps * scale, rtol=0,
                        what="fused vs unfused")
    assert (fused - theta).abs().max() > 1e-4  # and the update did move the weights

    undecayed = theta.clone()  # the decay flag off (biases, norms): no decay at all
    zaxpy_([ZTarget(undecayed, where, decay=False)], seeds, [0.0, 0.0, 0.0], [0.0] * 3, decay=0.5, kind=kind)
    assert torch.equal(undecayed, theta)


@pytest.mark.parametrize("kind", list(ZKind))
def test_fp32_round_trip_restores(kind):
    """+ε, -2ε, +ε on fp32 weights: every weight back to within 1e-6 relative (of its own magnitude or, for
    weights near zero, of the tensor's scale)."""
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(300, 257, generator=gen) * 0.02
    theta[0] = 1.0  # norm-like weights near 1
    original = theta.clone()
    target = [ZTarget(theta, ZSlice(KEY, 257))]
    for coef in (1e-3, -2e-3, 1e-3):
        zaxpy_(target, [77], [coef], kind=kind)
    assert not torch.equal(theta, original) or kind is ZKind.RADEMACHER
    err = (theta - original).abs() / torch.maximum(original.abs(), original.abs().mean().expand_as(original))
    assert err.max().item() <= 1e-6, err.max().item()


def test_strided_1d_views_are_refused():
    t = torch.zeros(10)
    with pytest.raises(ValueError, match="unit stride"):
        zaxpy_([ZTarget(t[::2], ZSlice(KEY, 5))], [1], [1.0])


@pytest.mark.slow
def test_pass_allocates_no_parameter_sized_temporary():
    """Run one Gaussian and one Rademacher pass over a 256 MiB tensor, and over a one-column block of 256k rows, in a
    fresh process and read the peak RSS: the growth must stay far below the tensor's size (a copy of it would add
    256 MiB; generating whole Philox groups for each one-element row without a bound would add gigabytes)."""
    script = textwrap.dedent(
        """
        import resource, torch
        from sglang_mezo.kernels import ZKind, ZSlice, ZTarget, zaxpy_
        theta = torch.ones(1 << 26)
        narrow = torch.ones(1 << 18, 2)[:, :1]  # 1 column of a 2-column tensor: one short run per row
        warm = torch.ones(1 << 17)
        for kind in ZKind:
            zaxpy_([ZTarget(warm, ZSlice(1, warm.numel()))], [1], [1e-3], kind=kind)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for kind in ZKind:
            zaxpy_([ZTarget(theta, ZSlice(1, theta.numel()))], [1, 2], [1e-3, 0.0], [0.0, 1e-4], decay=0.99,
                   kind=kind)
            zaxpy_([ZTarget(narrow, ZSlice(2, 2))], [1], [1e-3], kind=kind)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth_mib = int(out.stdout.strip())
    assert growth_mib < 48, f"peak RSS grew by {growth_mib} MiB during passes over a 256 MiB tensor"


def test_empty_blocks_are_a_no_op():
    """A TP shard can hold no element of a checkpoint tensor (all padding): it takes part in no pass."""
    wide = torch.zeros(4, 3)
    zaxpy_([ZTarget(wide[:, :0], ZSlice(KEY, 3)), ZTarget(wide, ZSlice(KEY, 3))], [1], [1.0])
    assert torch.equal(wide, materialize_z(1, ZSlice(KEY, 3), (4, 3)))
