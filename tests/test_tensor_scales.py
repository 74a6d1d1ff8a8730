"""Per-tensor scales (``tensor_scale = pretrained_rms``): the scales' arithmetic, a scaled pass equal bit for bit to
the plain pass with its coefficients scaled (every kernel path), the mean step on a quadratic whose gradient is
known (along -S²∇L), and bit-identical replay of a scaled run with failed steps on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import FlakyLoss, mean_step, memorisation_task, quadratic, tiny_llama, train_through_failures

from sglang_mezo.core.config import MezoConfig, TensorScale
from sglang_mezo.core.master import MasterWeights
from sglang_mezo.core.objectives import Objective, batch_loss_fn
from sglang_mezo.core.params import TrainablePiece, TrainableSet
from sglang_mezo.core.run import MezoRun, run_step
from sglang_mezo.core.scales import FLOOR, pretrained_rms_scales, square_sum
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.engines.hf import HFEngine
from sglang_mezo.kernels import ZKind, ZSlice, ZTarget, tensor_key, zaxpy_


def test_scales_are_each_tensors_rms_against_the_sets():
    tensors = {"gain": torch.full((4,), 2.0), "matrix": torch.full((3, 4), 0.5), "bias": torch.zeros(4)}
    scales = pretrained_rms_scales({n: square_sum(t) for n, t in tensors.items()})
    whole = math.sqrt((4 * 4.0 + 12 * 0.25) / 20)
    assert scales["gain"] == pytest.approx(2.0 / whole) and scales["matrix"] == pytest.approx(0.5 / whole)
    assert scales["bias"] == FLOOR  # zeros still move, a little
    unfloored = pretrained_rms_scales({n: square_sum(t) for n, t in tensors.items() if n != "bias"})
    assert math.fsum(unfloored[n] ** 2 * tensors[n].numel() for n in unfloored) == pytest.approx(16)  # = d
    with pytest.raises(ValueError, match="all zero"):
        pretrained_rms_scales({"bias": square_sum(torch.zeros(3))})


def test_a_config_with_a_scale_rule_needs_its_scales_and_keeps_them():
    with pytest.raises(ValueError, match="resolved"):
        MezoConfig(tensor_scale=TensorScale.PRETRAINED_RMS)
    with pytest.raises(ValueError, match="resolved"):
        MezoConfig(tensor_scales=(("a", 1.0),))
    with pytest.raises(ValueError, match="positive finite"):
        MezoConfig(tensor_scale="pretrained_rms", tensor_scales=(("a", 0.0),))
    config = MezoConfig(tensor_scale="pretrained_rms", tensor_scales=[("a", 2.0), ("b", 0.5)])
    assert MezoConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("path", ["fp32 numba", "bf16 torch", "bf16 through a master", "fp32 triton interpreter"])
def test_a_scaled_target_moves_as_its_coefficients_times_the_scale(path, monkeypatch):
    """θ ← (θ + s·Σ r_k z_k)·d + s·Σ u_k z_k, bit for bit the plain pass given coefficients × s (in float64, then
    rounded once, as every path rounds its coefficients); a scale of 1 is the plain pass itself."""
    if path.endswith("interpreter"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dtype = torch.bfloat16 if path.startswith("bf16") else torch.float32
    base = (torch.randn(5, 37, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
    where = ZSlice(tensor_key("w"), 37)
    seeds, restore, update, scale = [3, 9], [1e-3, -2e-3], [0.0, -7.5e-4], 0.37

    def one(coef_scale: float, target_scale: float) -> torch.Tensor:
        theta = base.clone()
        master = MasterWeights().master_of(theta) if "master" in path else None
        target = ZTarget(theta, where, decay=True, master=master, scale=target_scale)
        zaxpy_([target], seeds, [c * coef_scale for c in restore], [c * coef_scale for c in update], decay=0.999,
               kind=ZKind.GAUSSIAN, force_triton="triton" in path)
        return theta if master is None else master

    assert torch.equal(one(scale, 1.0), one(1.0, scale))
    assert not torch.equal(one(1.0, 1.0), one(1.0, scale))


STEPS, PROBES = 400, 4


def test_the_mean_scaled_step_points_along_minus_s_squared_grad():
    """SPSA in the coordinates φ = θ/s: the mean step is -lr·S²∇L (S the per-element scale). Same statistics as
    test_estimators' unscaled test (cosine > 0.9; the component along S²∇L within 15 % of lr), which a step that
    ignored the scales fails: S²∇L's cosine with ∇L is under 0.8 here (0.49 measured for the mean step). Measured:
    cosine 0.993, along 0.997 (Rademacher); 0.991, 1.028 (Gaussian). One kind: the scale is the kernels' (above)."""
    params, tensors, loss, grad = quadratic()
    scales = {"a.weight": 0.5, "a.bias": 2.0}
    s2 = torch.cat([torch.full((tensors[n].numel(),), scales[n] ** 2, dtype=torch.float64) for n in tensors])
    config = MezoConfig(lr=1e-3, eps=1e-3, n_probes=PROBES, z_kind=ZKind.RADEMACHER, total_steps=STEPS, seed=11,
                        tensor_scale="pretrained_rms", tensor_scales=tuple(scales.items()))
    mean = mean_step(tensors, STEPS, lambda k: run_step(params, config, k, loss))
    preconditioned = s2 * grad
    cosine = float(torch.nn.functional.cosine_similarity(-mean, preconditioned, dim=0))
    along = float(-mean @ preconditioned) / float(preconditioned @ preconditioned)
    assert cosine > 0.9, cosine
    assert along / config.lr == pytest.approx(1.0, abs=0.15)
    assert float(torch.nn.functional.cosine_similarity(preconditioned, grad, dim=0)) < 0.8  # the test can tell


def test_a_scaled_run_replays_bit_identically(tmp_path):
    """Failed steps on the way; the saved trajectory (format 4: a version-3 reader must refuse what it would
    replay unscaled) replays onto the base weights bit for bit, with no checkpoint: the scales are in it."""
    engine = HFEngine(tiny_llama(5))
    pieces = engine.trainable_pieces()
    names = sorted({p.name for p in pieces if "layers.1." in p.name or p.name == "model.norm.weight"})
    scales = pretrained_rms_scales({n: square_sum(dict(engine.model.named_parameters())[n]) for n in names})
    config = MezoConfig(lr=1e-3, eps=1e-3, weight_decay=0.1, n_probes=2, z_kind=ZKind.RADEMACHER, total_steps=5,
                        seed=77, selection=MezoConfig().selection.__class__(include=tuple(f"^{n}$" for n in names)),
                        adaptive="scalar_rms", tensor_scale="pretrained_rms", tensor_scales=tuple(scales.items()))
    params = TrainableSet.from_pieces(pieces, config.selection, engine.num_layers)
    run = MezoRun(params, config)
    score = batch_loss_fn(engine, Objective.CROSS_ENTROPY, memorisation_task())
    flaky = FlakyLoss(score, {1: 3, 3: -2})
    train_through_failures(run, flaky)
    assert [r.aborted_passes for r in run.trajectory if not r.committed] == [3, 2]
    path = run.trajectory.save(tmp_path / "run.json")
    assert Trajectory.load(path).to_dict()["format_version"] == 4 and run.trajectory.tensor_scales == scales

    fresh = HFEngine(tiny_llama(5))
    unscaled = HFEngine(tiny_llama(5))
    for target in (fresh, unscaled):
        replay_params = TrainableSet.from_pieces(target.trainable_pieces(), config.selection, target.num_layers)
        loaded = Trajectory.load(path)
        if target is unscaled:
            loaded.config = {**loaded.config, "tensor_scales": []}
        assert loaded.replay(replay_params) == config.total_steps
    trained = dict(engine.model.named_parameters())
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p, trained[name]), f"exact replay differs in {name}"
    assert not all(torch.equal(p, trained[n]) for n, p in unscaled.model.named_parameters())


def test_scaled_sets_share_the_weights_and_are_made_once():
    tensors = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    params = TrainableSet.from_pieces([TrainablePiece(n, t, tuple(t.shape)) for n, t in tensors.items()])
    scaled = params.variant({"a": 2.0, "b": 0.5})
    assert params.variant([("b", 0.5), ("a", 2.0)]) is scaled and params.variant(()) is params
    assert [t.scale for t in scaled.targets] == [2.0, 0.5] and scaled.targets[0].theta.data_ptr() == tensors["a"].data_ptr()
    with pytest.raises(ValueError, match="exactly the trainable tensors"):
        params.variant({"a": 1.0})
