"""Low-rank z (stream version 2, ``z_rank``): its definition from the version-1 factor streams, golden values, shards
equal to slices of the whole, every pass path, statistics, the mean step on a quadratic, bit-identical replay."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import FlakyLoss, mean_step, memorisation_task, quadratic, tiny_llama, train_through_failures

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.master import MasterWeights
from sglang_mezo.core.objectives import Objective, batch_loss_fn
from sglang_mezo.core.params import ParamSelection, TrainableSet
from sglang_mezo.core.run import MezoRun, run_step
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.engines.hf import HFEngine
from sglang_mezo.kernels import READABLE, ZKind, ZSlice, ZTarget, materialize_z, tensor_key, zaxpy_
from sglang_mezo.kernels.z_lowrank import factor_key


def lowrank(seed: int, where: ZSlice, shape: tuple[int, int], kind: ZKind, rank: int) -> torch.Tensor:
    """The low-rank z of a block, through a pass: 0 + 1·z."""
    out = torch.zeros(shape)
    zaxpy_([ZTarget(out, where, decay=False, rank=rank)], [seed], [1.0], kind=kind)
    return out


@pytest.mark.parametrize("kind", list(ZKind))
@pytest.mark.parametrize("rank", [1, 3])
def test_z_is_the_product_of_two_version_1_factor_streams(kind, rank):
    key = tensor_key("w")
    z = lowrank(9, ZSlice(key, 37), (11, 37), kind, rank)
    u = materialize_z(9, ZSlice(factor_key(key, 0), rank), (11, rank), kind).double()
    v = materialize_z(9, ZSlice(factor_key(key, 1), rank), (37, rank), kind).double()
    exact = u @ v.T / math.sqrt(rank)
    assert torch.allclose(z.double(), exact, rtol=1e-6, atol=1e-6)
    assert torch.linalg.matrix_rank(z.double(), rtol=1e-5) == rank  # up to the fp32 rounding of each entry
    assert not torch.equal(z, lowrank(10, ZSlice(key, 37), (11, 37), kind, rank))


def test_golden_values_version_2():
    """Literal values of the low-rank z (rank 2, seed 42, a 2 × 4 matrix keyed like the golden dense ones). If this
    fails, the definition changed: that is a new stream version, and version 2 must stay replayable."""
    assert READABLE == (1, 2)
    where = ZSlice(tensor_key("model.embed_tokens.weight"), 4)
    assert lowrank(42, where, (2, 4), ZKind.GAUSSIAN, 2).flatten().tolist() == [
        0.21439224481582642, -0.1186218410730362, 0.47903794050216675, -0.16058477759361267,
        0.5827628374099731, -1.1673946380615234, -1.1186168193817139, -1.9149436950683594]
    r2 = 1.4142135381698608  # fp32(1/√2)·(±1 ± 1)
    assert lowrank(42, where, (2, 4), ZKind.RADEMACHER, 2).flatten().tolist() == [
        r2, -r2, 0.0, r2, 0.0, 0.0, -r2, 0.0]


def test_a_shard_is_a_slice_of_the_whole_matrix():
    """Every TP rank regenerates its own block: rows and columns at an offset give the whole z's slice, bit for bit."""
    key = tensor_key("model.layers.0.mlp.down_proj.weight")
    whole = lowrank(5, ZSlice(key, 50), (20, 50), ZKind.GAUSSIAN, 4)
    shard = lowrank(5, ZSlice(key, 50, row_offset=7, col_offset=13), (9, 30), ZKind.GAUSSIAN, 4)
    assert torch.equal(shard, whole[7:16, 13:43])


def test_statistics_unit_variance_and_no_mean():
    z = lowrank(3, ZSlice(tensor_key("m"), 512), (512, 512), ZKind.GAUSSIAN, 4).double()
    assert abs(z.mean()) < 0.02 and abs(z.var() - 1) < 0.1  # a rank-4 matrix: the entries are far from independent


@pytest.mark.parametrize("path", ["bf16 in place", "bf16 through a master"])
def test_every_path_does_the_fp32_arithmetic(path):
    """(θ + Σ r·z)·d + Σ u·z, in fp32, as the fp32 pass: a half-precision block in place is the fp32 result rounded;
    through a master, a probe leaves the master as it was and a commit moves it as the fp32 pass moves fp32."""
    where = ZSlice(tensor_key("w"), 24)
    base = torch.randn(6, 24, generator=torch.Generator().manual_seed(2)) * 0.02
    seeds, restore, update = [4, 8], [1e-3, -2e-3], [0.0, 3e-4]
    fp32 = base.clone()
    zaxpy_([ZTarget(fp32, where, rank=2)], seeds, restore, update, decay=0.99, kind=ZKind.RADEMACHER)
    served = base.to(torch.bfloat16)
    if path == "bf16 in place":
        theta = served.float().clone()  # bf16 values, fp32 math: the pass is exact on them
        zaxpy_([ZTarget(theta, where, rank=2)], seeds, restore, update, decay=0.99, kind=ZKind.RADEMACHER)
        zaxpy_([ZTarget(served, where, rank=2)], seeds, restore, update, decay=0.99, kind=ZKind.RADEMACHER)
        assert torch.equal(served, theta.to(torch.bfloat16))
        return
    master = MasterWeights().master_of(served, base)
    target = ZTarget(served, where, master=master, rank=2)
    zaxpy_([target], seeds, restore, kind=ZKind.RADEMACHER, commit=False)
    assert torch.equal(master, base)  # a probe never touches the truth
    zaxpy_([target], seeds, restore, update, decay=0.99, kind=ZKind.RADEMACHER, commit=True)
    assert torch.equal(master, fp32) and torch.equal(served, fp32.to(torch.bfloat16))


def test_vectors_move_along_dense_z_and_matrices_along_low_rank_z():
    tensors = {"m": torch.zeros(4, 6), "g": torch.zeros(6)}
    from sglang_mezo.core.params import TrainablePiece

    params = TrainableSet.from_pieces([TrainablePiece(n, t, tuple(t.shape)) for n, t in tensors.items()])
    params.variant(z_rank=2).apply([7], [1.0], kind=ZKind.GAUSSIAN)
    assert torch.equal(tensors["g"], materialize_z(7, ZSlice(tensor_key("g"), 6), (1, 6))[0])
    assert torch.equal(tensors["m"], lowrank(7, ZSlice(tensor_key("m"), 6), (4, 6), ZKind.GAUSSIAN, 2))


def test_the_mean_low_rank_step_points_down_the_gradient():
    """E[z zᵀ] = I for the low-rank z too, so SPSA's mean step is -lr·∇L: the same test and tolerances as the dense
    one (test_estimators). Measured here: cosine 0.946, along 1.006."""
    params, tensors, loss, grad = quadratic()
    config = MezoConfig(lr=1e-2, eps=1e-3, n_probes=4, z_kind=ZKind.GAUSSIAN, total_steps=400, seed=11, z_rank=2)
    mean = mean_step(tensors, config.total_steps, lambda k: run_step(params, config, k, loss))
    cosine = float(torch.nn.functional.cosine_similarity(-mean, grad, dim=0))
    along = float(-mean @ grad) / float(grad @ grad) / config.lr
    assert cosine > 0.9, cosine
    assert along == pytest.approx(1.0, abs=0.15)


def test_a_low_rank_run_replays_bit_identically(tmp_path):
    """Failed steps on the way; the trajectory says it needs stream version 2 and replays bit for bit."""
    config = MezoConfig(lr=1e-3, eps=1e-3, weight_decay=0.1, n_probes=2, z_kind=ZKind.RADEMACHER, total_steps=5,
                        seed=77, adaptive="scalar_rms", z_rank=2, selection=ParamSelection(last_layers=1))
    engine = HFEngine(tiny_llama(5))
    params = TrainableSet.from_pieces(engine.trainable_pieces(), config.selection, engine.num_layers)
    run = MezoRun(params, config)
    score = batch_loss_fn(engine, Objective.CROSS_ENTROPY, memorisation_task())
    flaky = FlakyLoss(score, {1: 3, 3: -2})
    train_through_failures(run, flaky)
    path = run.trajectory.save(tmp_path / "run.json")
    loaded = Trajectory.load(path)
    assert loaded.generator_version == 2 and loaded.z_rank == 2
    fresh = HFEngine(tiny_llama(5))
    assert loaded.replay(TrainableSet.from_pieces(fresh.trainable_pieces(), config.selection,
                                                  fresh.num_layers)) == config.total_steps
    trained = dict(engine.model.named_parameters())
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p, trained[name]), f"exact replay differs in {name}"
    with pytest.raises(ValueError, match="needs 2"):  # a version-1 document cannot hold a low-rank run
        Trajectory.from_dict({**loaded.to_dict(), "generator_version": 1})
    # the job's own trajectory is made before its config names the rank: it still restores (its best step)
    in_memory = Trajectory(z_kind=loaded.z_kind, trainable_fingerprint=loaded.trainable_fingerprint,
                           trainable_names=loaded.trainable_names, config=loaded.config, records=loaded.records)
    assert in_memory.needs == 2
    in_memory.check_compatible(params)
    with pytest.raises(ValueError, match="rank"):
        MezoConfig(z_rank=65)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_check.sh runs it on one)")
@pytest.mark.parametrize("kind", list(ZKind))
def test_cuda_low_rank_z_equals_the_cpu_s_bit_for_bit(kind):
    """The factors come from the version-1 kernels (Triton there, numba here) and the product from elementwise fp32
    ops, correctly rounded on both: the same bits (Gaussian: but for the double-rounding case of stream.py, about
    one factor element in 2^29, which these sizes are unlikely to meet)."""
    where = ZSlice(tensor_key("model.layers.3.mlp.up_proj.weight"), 1536, row_offset=5)
    seeds, restore, update = [11, 12], [1e-3, -1e-3], [2e-4, -3e-4]
    base = torch.randn(64, 1536, generator=torch.Generator().manual_seed(0)) * 0.02
    cpu, gpu = base.clone(), base.cuda()
    for theta in (cpu, gpu):
        zaxpy_([ZTarget(theta, where, rank=4)], seeds, restore, update, decay=0.999, kind=kind)
    assert torch.equal(gpu.cpu(), cpu)
