"""Half-precision weights behind fp32 masters (:mod:`sglang_mezo.core.master`): probes never round the truth, an
lr = 0 run leaves the served weights bit-identical, and the master moves exactly as fp32 weights do under an
update-only replay of the same steps."""

from __future__ import annotations

import pytest
import torch

from sglang_mezo.core.master import MasterWeights
from sglang_mezo.core.params import TrainablePiece, TrainableSet
from sglang_mezo.core.spsa import apply_update, mezo_step
from sglang_mezo.kernels import ZKind, ZSlice, ZTarget, materialize_z, tensor_key, zaxpy_

SHAPES = {"model.layers.0.mlp.up_proj.weight": (48, 40), "model.layers.0.input_layernorm.weight": (40,)}


def half_set(dtype: torch.dtype, seed: int = 0) -> tuple[TrainableSet, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in SHAPES.items():
        values = torch.randn(shape, generator=gen) * 0.05 + (1.0 if "norm" in name else 0.0)
        tensors[name] = values.to(dtype)
    pieces = [TrainablePiece(n, t, tuple(t.shape)) for n, t in tensors.items()]
    return TrainableSet.from_pieces(pieces, masters=MasterWeights()), tensors


def loss_of(tensors: dict[str, torch.Tensor]):
    """A quadratic pulling every weight towards 0.3: real gradients, evaluated on the served (rounded) weights."""
    return lambda: 0.5 * sum(float(((t.double() - 0.3) ** 2).sum()) for t in tensors.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(ZKind))
def test_lr_zero_leaves_the_served_weights_bit_identical(dtype, kind):
    params, tensors = half_set(dtype)
    before = {n: t.clone() for n, t in tensors.items()}
    for step in range(50):
        mezo_step(params, loss_of(tensors), [1000 + 2 * step, 1001 + 2 * step], eps=1e-3, lr=0.0, kind=kind)
    for name, t in tensors.items():
        assert torch.equal(t, before[name]), name
    for target in params.targets:
        assert torch.equal(target.master, target.theta.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_probe_serves_the_rounded_master_plus_eps_z(dtype):
    params, tensors = half_set(dtype)
    eps = 1e-2
    params.apply([7], [eps], kind=ZKind.GAUSSIAN)
    for target, (name, t) in zip(params.targets, tensors.items(), strict=True):
        z = materialize_z(7, ZSlice(tensor_key(name), t.shape[-1]), tuple(target.master.shape))
        assert torch.equal(target.theta, (target.master + eps * z).to(dtype)), name
    params.apply([7], [-2 * eps], kind=ZKind.GAUSSIAN)  # to -εz: from the master, not from the rounded +εz
    for target, (name, t) in zip(params.targets, tensors.items(), strict=True):
        z = materialize_z(7, ZSlice(tensor_key(name), t.shape[-1]), tuple(target.master.shape))
        assert torch.equal(target.theta, (target.master + (-eps) * z).to(dtype)), name
    assert params.masters.probing
    params.apply([7], [eps], kind=ZKind.GAUSSIAN)
    assert not params.masters.probing
    for target in params.targets:
        assert torch.equal(target.theta, target.master.to(dtype))


@pytest.mark.parametrize("kind", list(ZKind))
def test_the_master_moves_as_fp32_weights_under_an_update_only_replay(kind):
    """200 steps at a realistic lr on bf16: the updates land (the served weights move towards the optimum), and the
    master equals, bit for bit, fp32 weights started from the same values and given the same recorded updates in
    one pass each: the commit is the plain fp32 pass, the probes never touch the master."""
    params, tensors = half_set(torch.bfloat16)
    start = {n: t.float() for n, t in tensors.items()}
    loss = loss_of(tensors)
    first = loss()
    steps = []
    for step in range(200):
        steps.append(mezo_step(params, loss, [10 * step + 1], eps=1e-3, lr=5e-4, kind=kind))
    assert loss() < 0.95 * first

    fp32 = {n: t.clone() for n, t in start.items()}
    replay = TrainableSet.from_pieces([TrainablePiece(n, t, tuple(t.shape)) for n, t in fp32.items()])
    for result in steps:
        apply_update(replay, result.seeds, result.applied_update, decay=1.0, kind=kind)
    for target, name in zip(params.targets, tensors, strict=True):
        assert torch.equal(target.master.view(fp32[name].shape), fp32[name]), name
        assert torch.equal(tensors[name], fp32[name].to(torch.bfloat16)), name


def test_an_update_in_bf16_without_a_master_is_lost_and_with_one_is_kept():
    """Why masters exist: lr·g·z ≈ 1e-6 on weights near 1 rounds away in bf16 (spacing 2^-7), in place."""
    gen = torch.Generator().manual_seed(3)
    norm = (1.0 + 0.05 * torch.randn(1, 512, generator=gen)).to(torch.bfloat16)
    plain, backed = norm.clone(), norm.clone()
    where = ZSlice(tensor_key("model.norm.weight"), 512)
    zaxpy_([ZTarget(plain, where)], [5], [0.0], [1e-6], kind=ZKind.RADEMACHER)
    assert torch.equal(plain, norm)  # every update lost
    masters = MasterWeights()
    [target] = masters.attach([ZTarget(backed, where)])
    fp32 = norm.float()
    for _ in range(5000):
        masters.apply([target], [5], [0.0], [1e-6], kind=ZKind.RADEMACHER)
        zaxpy_([ZTarget(fp32, where)], [5], [0.0], [1e-6], kind=ZKind.RADEMACHER)
    assert torch.equal(target.master, fp32)  # what fp32 weights keep, the master keeps
    # each add of 1e-6 near 1.0 rounds by at most half an fp32 spacing (2^-24): 5000 of them, 3e-4 at most
    z = materialize_z(5, where, (1, 512), ZKind.RADEMACHER)
    torch.testing.assert_close(target.master - norm.float(), 5e-3 * z, rtol=0, atol=5000 * 2**-24)
    assert torch.equal(backed, target.master.to(torch.bfloat16))  # and served as they add up to bf16 steps
    assert not torch.equal(backed, norm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_triton_kernel_serves_and_commits_as_the_cpu_path(dtype):
    """The same passes through the Triton kernel (compiled on CUDA when a GPU is present, interpreted otherwise) and
    the compiled CPU path: equal bits, on a block that is a strided slice of a larger tensor (a TP shard's column
    slice)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(1)
    full = (torch.randn(24, 64, generator=gen) * 0.05).to(dtype)
    results = []
    for on, force in (("cpu", False), (device, True)):
        served = full.clone().to(on)
        block = served[:, 16:48]
        master = block.float().contiguous()
        target = ZTarget(block, ZSlice(tensor_key("w"), 64, 0, 16), master=master)
        zaxpy_([target], [11, 12], [1e-3, -1e-3], kind=ZKind.GAUSSIAN, commit=False, force_triton=force)
        probed = served.cpu()
        zaxpy_([target], [11, 12], [0.0, 0.0], [1e-4, 2e-4], decay=0.999, kind=ZKind.GAUSSIAN, commit=True,
               force_triton=force)
        results.append((probed, served.cpu(), master.cpu()))
    for cpu, triton in zip(*results, strict=True):
        assert torch.equal(cpu, triton)
    probed, served, _ = results[0]
    assert torch.equal(probed[:, :16], full[:, :16]) and torch.equal(served[:, 48:], full[:, 48:])


def test_mixing_targets_with_and_without_a_master_is_refused():
    a, b = torch.zeros(1, 4, dtype=torch.bfloat16), torch.zeros(1, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="master"):
        zaxpy_([ZTarget(a, ZSlice(1, 4), master=a.float()), ZTarget(b, ZSlice(2, 4))], [1], [1.0])


def test_a_reload_then_replay_gives_the_same_master():
    params, tensors = half_set(torch.bfloat16)
    base = {n: t.clone() for n, t in tensors.items()}
    results = [mezo_step(params, loss_of(tensors), [s], eps=1e-3, lr=1e-3) for s in (1, 2, 3)]
    trained = [t.master.clone() for t in params.targets]
    for target, name in zip(params.targets, tensors, strict=True):
        params.masters.load(target.theta, base[name])
    params.masters.forget_probe()
    assert all(torch.equal(tensors[n], base[n]) for n in tensors)
    for r in results:
        apply_update(params, r.seeds, r.applied_update, decay=1.0, kind=ZKind.GAUSSIAN)
    assert all(torch.equal(t.master, m) for t, m in zip(params.targets, trained, strict=True))
    assert params.masters.nbytes == 4 * sum(t.numel() for t in tensors.values())
