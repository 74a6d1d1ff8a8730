"""The trajectory log: replay onto the base weights reproduces the trained weights, it stays small, and it refuses
to replay onto tensors or a generator it was not recorded with."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_models import FlakyLoss, memorisation_task, tiny_llama

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import Objective, batch_loss_fn
from sglang_mezo.core.params import ParamSelection, TrainablePiece, TrainableSet
from sglang_mezo.core.run import MezoRun
from sglang_mezo.core.schedules import LRSchedule
from sglang_mezo.core.spsa import NonFiniteLossError
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.engines.hf import HFEngine
from sglang_mezo.kernels import ZKind

CONFIG = MezoConfig(lr=3e-3, eps=1e-3, weight_decay=0.1, n_probes=2, schedule=LRSchedule.COSINE, warmup_steps=3,
                    total_steps=40, seed=1234, selection=ParamSelection(exclude=(r"layers\.0\.mlp",)))


def trained(kind: ZKind, tmp_path):
    engine = HFEngine(tiny_llama(5))
    params = TrainableSet.from_pieces(engine.trainable_pieces(), CONFIG.selection, engine.num_layers)
    config = dataclasses.replace(CONFIG, z_kind=kind)
    run = MezoRun(params, config, base_model="tiny_llama(5)")
    loss = batch_loss_fn(engine, Objective.CROSS_ENTROPY, memorisation_task())
    for _ in range(config.total_steps):
        run.step(loss)
    path = run.trajectory.save(tmp_path / "run.json.gz")
    return engine.model, path


def base_params(selection=CONFIG.selection):
    engine = HFEngine(tiny_llama(5))
    return engine.model, TrainableSet.from_pieces(engine.trainable_pieces(), selection, engine.num_layers)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(ZKind))
def test_replay_reproduces_the_trained_weights(kind, tmp_path):
    model, path = trained(kind, tmp_path)
    trajectory = Trajectory.load(path)
    assert len(trajectory) == CONFIG.total_steps and trajectory.z_kind is kind
    assert MezoConfig.from_dict(trajectory.config) == dataclasses.replace(CONFIG, z_kind=kind)

    exact_model, params = base_params()
    assert trajectory.replay(params, exact=True) == CONFIG.total_steps
    for (name, p), q in zip(model.named_parameters(), exact_model.parameters(), strict=True):
        assert torch.equal(p, q), f"exact replay differs in {name}"

    # Update-only replay skips the probes, so it misses their fp32 round-trip error: a random walk of about one
    # ulp per probe (80 here). Measured: 1.07e-6 at scale 1.0 on the norm weights, 9 ulp. Bound: 4e-6 of the scale.
    update_model, params = base_params()
    trajectory.replay(params, exact=False)
    for (name, p), q in zip(model.named_parameters(), update_model.parameters(), strict=True):
        scale = p.abs().max().item()
        assert (p - q).abs().max().item() <= 4e-6 * scale, f"update-only replay too far off in {name}"

    untouched, _ = base_params()  # the excluded tensors never moved
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, untouched.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight,
                           untouched.model.layers[1].mlp.down_proj.weight)


@pytest.mark.slow
def test_replay_upto_a_step(tmp_path):
    _, path = trained(ZKind.RADEMACHER, tmp_path)
    trajectory = Trajectory.load(path)
    part_model, params = base_params()
    assert trajectory.replay(params, upto=10) == 10
    rest = Trajectory.from_dict(trajectory.to_dict())
    rest.records = rest.records[10:]
    rest.replay(params)
    whole_model, params = base_params()
    trajectory.replay(params)
    for p, q in zip(part_model.parameters(), whole_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_replay_refuses_other_tensors_or_generator(tmp_path):
    _, path = trained(ZKind.RADEMACHER, tmp_path)
    trajectory = Trajectory.load(path)
    _, other = base_params(ParamSelection())
    with pytest.raises(ValueError, match="trainable tensors differ"):
        trajectory.replay(other)
    data = trajectory.to_dict()
    data["generator_version"] = 99
    _, params = base_params()
    with pytest.raises(ValueError, match="generator version 99"):
        Trajectory.from_dict(data).replay(params)


def test_a_thousand_step_log_is_a_few_tens_of_kb(tmp_path):
    """1,000 real steps (a cosine schedule, so every lr differs) on a small tensor with a cheap loss."""
    t = torch.randn(64, 64) * 0.1
    params = TrainableSet.from_pieces([TrainablePiece("w.weight", t, (64, 64))])
    run = MezoRun(params, MezoConfig(lr=1e-3, total_steps=1000, schedule=LRSchedule.COSINE, seed=7))
    for _ in range(1000):
        run.step(lambda: float((t.double() ** 2).sum()))
    plain = run.trajectory.save(tmp_path / "run.json").stat().st_size
    packed = run.trajectory.save(tmp_path / "run.json.gz").stat().st_size
    assert packed < 40_000 and plain < 100_000, (packed, plain)
    assert json.loads((tmp_path / "run.json").read_text())["steps"]["step"] == list(range(1000))


@pytest.mark.parametrize("kind", list(ZKind))
def test_failed_steps_are_recorded_so_exact_replay_stays_bit_identical(kind, tmp_path):
    """A step that fails after perturbing leaves the weights ~1 ulp off the committed ones (the round trip's
    rounding). The trajectory records its probe passes, so exact replay still reproduces the weights bit for bit,
    whichever of the 2n loss calls (or the non-finite check) it failed at."""
    config = dataclasses.replace(CONFIG, n_probes=2, total_steps=8, z_kind=kind)
    engine = HFEngine(tiny_llama(5))
    params = TrainableSet.from_pieces(engine.trainable_pieces(), config.selection, engine.num_layers)
    run = MezoRun(params, config)
    score = batch_loss_fn(engine, Objective.CROSS_ENTROPY, memorisation_task())
    flaky = FlakyLoss(score, {1: 1, 3: 2, 5: 3, 7: 4, 9: -4})  # attempt -> the failing call (negative: NaN)
    failures = 0
    while run.next_step < config.total_steps:
        try:
            run.step(flaky)
        except (RuntimeError, NonFiniteLossError):
            failures += 1
        flaky.next_attempt()
    assert failures == 5
    aborted = [r.aborted_passes for r in run.trajectory if not r.committed]
    assert aborted == [1, 2, 3, 4, 4] and run.trajectory.committed_steps == config.total_steps

    path = run.trajectory.save(tmp_path / "run.json")
    replayed = HFEngine(tiny_llama(5))
    replayed_params = TrainableSet.from_pieces(replayed.trainable_pieces(), config.selection, replayed.num_layers)
    assert Trajectory.load(path).replay(replayed_params) == config.total_steps
    for (name, p), q in zip(engine.model.named_parameters(), replayed.model.parameters(), strict=True):
        assert torch.equal(p, q), f"exact replay differs in {name}"
    # without the aborted records, replay is off by the failed round trips' rounding (so the records matter)
    committed_only = Trajectory.load(path)
    committed_only.records = [r for r in committed_only.records if r.committed]
    other = HFEngine(tiny_llama(5))
    committed_only.replay(TrainableSet.from_pieces(other.trainable_pieces(), config.selection, other.num_layers))
    assert any(not torch.equal(p, q) for p, q in zip(engine.model.parameters(), other.model.parameters()))
