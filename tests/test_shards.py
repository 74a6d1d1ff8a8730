"""A step's batch shared between data-parallel replicas (``sglang_mezo.core.shards``, ``mezo_step``'s ``reduce``):
every example scored by exactly one replica, the combined losses exactly the whole batch's mean whatever the rows'
order, the sharded step's extra pass (its probes come off before the losses are combined) replayed bit for bit,
and its mean step on a quadratic still the gradient's direction."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny_models import FlakyLoss, mean_step, memorisation_task, quadratic, tiny_llama, train_through_failures

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import Objective, batch_loss_fn
from sglang_mezo.core.params import ParamSelection, TrainableSet, weights_digest
from sglang_mezo.core.run import MezoRun, run_step
from sglang_mezo.core.shards import combine, shard_of
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.engines.hf import HFEngine
from sglang_mezo.kernels import ZKind


@pytest.mark.parametrize("size, shards", [(16, 2), (7, 3), (2, 4), (1, 2), (0, 2)])
def test_every_example_goes_to_exactly_one_replica_and_the_remainder_moves_with_the_step(size, shards):
    batch = list(range(size))
    for step in range(5):
        parts = [shard_of(batch, step, r, shards) for r in range(shards)]
        assert sorted(e for part in parts for e in part) == batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if 0 < size % shards:  # the replica holding the extra example changes from step to step
        assert len({max(range(shards), key=lambda r: len(shard_of(batch, s, r, shards))) for s in range(shards)}) > 1
    with pytest.raises(ValueError, match="replica 2 of 2"):
        shard_of(batch, 0, 2, 2)


def test_combined_losses_are_the_whole_batch_mean_in_any_order():
    rng = random.Random(0)
    losses = [rng.uniform(0.1, 3.0) for _ in range(13)]
    parts = [losses[0:5], losses[5:6], [], losses[6:13]]
    rows = [[float(len(p)), math.fsum(p) / len(p) if p else 0.0] for p in parts]
    total = combine(rows)
    assert total == pytest.approx([math.fsum(losses) / len(losses)], rel=1e-15)
    for _ in range(5):  # the same floats whichever order the rows arrive in
        rng.shuffle(rows)
        assert combine(rows) == total
    with pytest.raises(ValueError, match="no replica scored"):
        combine([[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="unequal width"):
        combine([[1.0, 2.0], [1.0]])


def test_a_sharded_step_takes_its_probes_off_first_and_replays_bit_for_bit(monkeypatch):
    """Two replicas in one process: each loss call scores both halves of the batch at the same probe, replica 0's
    half goes to the step and replica 1's into the row it would have sent. The run (its probes off before the
    combine) and the trajectory's replay with ``shards = 2`` give the same bytes and make the same passes: one more
    per step than a one-replica step, which takes its last probe off inside the commit. (Our kernels round the
    take-off before the update either way, so here the bytes would agree even without it: replay repeats the
    passes the run made, whatever a kernel fuses.)"""
    config = MezoConfig(lr=1e-2, eps=1e-3, n_probes=2, z_kind=ZKind.GAUSSIAN, total_steps=4, seed=5, shards=2,
                        selection=ParamSelection(last_layers=1))
    batch = memorisation_task(n=5, seed=2)
    engine = HFEngine(tiny_llama(3))
    params = TrainableSet.from_pieces(engine.trainable_pieces(), config.selection, engine.num_layers)
    trajectory = Trajectory.for_params(params, config.z_kind, config=config.to_dict())
    whole = batch_loss_fn(engine, Objective.CROSS_ENTROPY, batch)
    for step in range(config.total_steps):
        halves = [shard_of(batch, step, r, 2) for r in range(2)]
        scorers = [batch_loss_fn(engine, Objective.CROSS_ENTROPY, h) for h in halves]
        other: list[float] = []
        wholes: list[float] = []

        def mine(scorers=scorers, other=other, wholes=wholes) -> float:
            other.append(scorers[1]())
            wholes.append(whole())
            return scorers[0]()

        def reduce(plus, minus, halves=halves, other=other):
            n = len(plus)
            rows = [[float(len(halves[0])), *plus, *minus], [float(len(halves[1])), *other[0::2], *other[1::2]]]
            totals = combine(rows)
            return totals[:n], totals[n:]

        result = run_step(params, config, step, mine, reduce=reduce)
        assert list(result.loss_plus) == pytest.approx(wholes[0::2], rel=1e-6)  # the whole batch's (fp32 losses)
        assert list(result.loss_minus) == pytest.approx(wholes[1::2], rel=1e-6)
        trajectory.append(step, result)
    assert trajectory.to_dict()["format_version"] == 4  # a reader of version 3 would replay it a pass short
    loaded = Trajectory.from_dict(trajectory.to_dict())
    passes = []
    apply = TrainableSet.apply
    monkeypatch.setattr(TrainableSet, "apply", lambda self, *a, **k: (passes.append(1), apply(self, *a, **k))[1])
    fresh = HFEngine(tiny_llama(3))
    loaded.replay(TrainableSet.from_pieces(fresh.trainable_pieces(), config.selection, fresh.num_layers))
    assert weights_digest(fresh.trainable_pieces()) == weights_digest(engine.trainable_pieces())
    sharded_passes, passes[:] = len(passes), []
    unsharded = Trajectory.from_dict({**loaded.to_dict(), "config": {**loaded.config, "shards": 1}})
    unsharded.replay(TrainableSet.from_pieces(HFEngine(tiny_llama(3)).trainable_pieces(), config.selection, 2))
    assert sharded_passes == len(passes) + config.total_steps == (2 * 2 + 1 + 1) * config.total_steps


def test_a_sharded_run_through_failures_replays_bit_for_bit(tmp_path):
    """FZOO with scalar_rms, steps failing on the way (their probe passes recorded), three shards."""
    config = MezoConfig(lr=1e-3, eps=1e-3, n_probes=2, z_kind=ZKind.RADEMACHER, total_steps=5, seed=9, shards=3,
                        adaptive="scalar_rms", estimator="fzoo", selection=ParamSelection(last_layers=1))
    engine = HFEngine(tiny_llama(5))
    run = MezoRun(TrainableSet.from_pieces(engine.trainable_pieces(), config.selection, engine.num_layers), config)
    train_through_failures(run, FlakyLoss(batch_loss_fn(engine, Objective.CROSS_ENTROPY, memorisation_task()),
                                          {1: 3, 3: -2}))
    assert any(not r.committed for r in run.trajectory.records)
    fresh = HFEngine(tiny_llama(5))
    loaded = Trajectory.load(run.trajectory.save(tmp_path / "run.json"))
    assert loaded.replay(TrainableSet.from_pieces(fresh.trainable_pieces(), config.selection, fresh.num_layers)) == 5
    assert weights_digest(fresh.trainable_pieces()) == weights_digest(engine.trainable_pieces())


def test_sharded_steps_descend_a_quadratic_along_its_gradient():
    """The mean update of many sharded steps (two "replicas", each reporting the same loss) points along -∇L: the
    extra take-off pass changes the rounding, never the estimator."""
    params, tensors, loss, grad = quadratic()
    config = MezoConfig(lr=1e-3, eps=1e-3, n_probes=1, z_kind=ZKind.GAUSSIAN, total_steps=2000, seed=1, shards=2)
    mean = mean_step(tensors, config.total_steps,
                     lambda k: run_step(params, config, k, loss, reduce=lambda p, m: (p, m)))
    cosine = float(torch.nn.functional.cosine_similarity(-mean, grad, dim=0))
    assert cosine > 0.9, cosine
