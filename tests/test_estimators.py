"""The estimators and step-size rules (``sglang_mezo.core.estimators``): their arithmetic by hand, their mean step on
a quadratic whose gradient is known, their cost in forwards and passes, bit-identical replay of each on a tiny
model (failed steps included), the default config giving exactly MeZO's step, and a job with an adaptive step
size carried across chunks by the job runner as one run would be."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from fakes import FakeExecutor, FakeScorer, replayed
from tiny_models import FlakyLoss, mean_step, memorisation_task, quadratic, tiny_llama, train_through_failures

from sglang_mezo.core import params as params_module
from sglang_mezo.core import spsa
from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.estimators import (
    Adaptive,
    AdaptiveState,
    Direction,
    Estimator,
    ScalarRMS,
    fzoo_direction,
    update_coefficients,
)
from sglang_mezo.core.objectives import Objective, batch_loss_fn
from sglang_mezo.core.params import TrainablePiece, TrainableSet
from sglang_mezo.core.run import MezoRun, run_step, seeds_for
from sglang_mezo.core.schedules import LRSchedule
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.engines.hf import HFEngine
from sglang_mezo.jobs.journal import JOURNAL, Journal, read
from sglang_mezo.jobs.runner import JobRunner
from sglang_mezo.jobs.spec import JobSpec
from sglang_mezo.kernels import ZKind, zaxpy_

METHODS = [(e, a) for e in Estimator for a in Adaptive]
IDS = [f"{e.value}-{a.value}" for e, a in METHODS]


# -- the arithmetic, by hand ------------------------------------------------------------------------------------------


def test_fzoo_differences_against_the_base_and_divides_by_the_sample_std():
    d = fzoo_direction([1.0, 3.0], base=1.5, eps=0.5)
    assert d.projected_grads == (-1.0, 3.0)  # (L_k - L0)/ε
    assert d.coefficients == pytest.approx((-0.5 / math.sqrt(2), 1.5 / math.sqrt(2)))  # stdev(1, 3) = √2
    assert fzoo_direction([2.0, 2.0, 2.0], base=1.0, eps=1e-3).coefficients == (0.0, 0.0, 0.0)  # σ = 0: no step
    with pytest.raises(ValueError, match="at least 2"):
        fzoo_direction([1.0], base=0.0, eps=1e-3)


def test_greedy_steps_along_the_probe_of_largest_projected_gradient():
    direction = Estimator.GREEDY.direction([1.0, 3.0, 2.0], [1.0, 1.0, 2.5], eps=0.5)
    assert direction.projected_grads == (0.0, 2.0, -0.5)
    assert direction.coefficients == (0.0, 6.0, 0.0)  # n·g_k*: the step is that probe's own SPSA step
    assert Estimator.GREEDY.direction([1.0, 0.0], [0.0, 1.0], eps=0.5).coefficients == (2.0, 0.0)  # ties: the first
    update, _ = update_coefficients(direction, lr=0.1, rule=None, state=AdaptiveState())
    assert update == pytest.approx((0.0, -0.2, 0.0))
    with pytest.raises(ValueError, match="at least 2 probes"):
        spsa.checked_step([1], Estimator.GREEDY, eps=1e-3, lr=1e-3, weight_decay=0.0)


def test_scalar_rms_keeps_a_bias_corrected_second_moment():
    rule = ScalarRMS(beta=0.5, floor=1e-8)
    first, state = update_coefficients(Direction((4.0, 0.0), (4.0, 0.0)), lr=0.1, rule=rule, state=AdaptiveState())
    assert state == AdaptiveState(second_moment=0.5 * 8.0, updates=1)  # mean c² = 8: v = (1 - β)·8
    assert first == pytest.approx((-0.1 / math.sqrt(8.0) * 4.0 / 2, 0.0))  # v̂ = v/(1 - β) = 8, then c/n
    second, state = update_coefficients(Direction((1.0,), (1.0,)), lr=0.1, rule=rule, state=state)
    assert state.second_moment == pytest.approx(0.5 * 4.0 + 0.5 * 1.0) and state.updates == 2
    assert second == pytest.approx((-0.1 / math.sqrt(2.5 / 0.75),))  # v̂ = v/(1 - β²)
    plain, same = update_coefficients(Direction((4.0, 2.0), (4.0, 2.0)), lr=0.1, rule=None, state=state)
    assert plain == (-0.1 * 4.0 / 2, -0.1 * 2.0 / 2) and same is state


def test_config_validates_and_round_trips_the_new_options():
    config = MezoConfig(n_probes=4, estimator="fzoo", adaptive="scalar_rms", rms_beta=0.9)
    assert config.estimator is Estimator.FZOO and config.adaptive_rule == ScalarRMS(0.9, 1e-8)
    assert MezoConfig.from_dict(config.to_dict()) == config
    assert MezoConfig().adaptive_rule is None and MezoConfig().estimator is Estimator.SPSA
    with pytest.raises(ValueError, match="n_probes >= 2"):
        MezoConfig(estimator="fzoo", n_probes=1)
    for bad in ({"rms_beta": 1.0}, {"rms_floor": 0.0}, {"estimator": "adam"}):
        with pytest.raises(ValueError):
            MezoConfig(**bad)


# -- on a quadratic whose gradient is known ---------------------------------------------------------------------------

STEPS, PROBES = 400, 4


@pytest.mark.parametrize("kind", list(ZKind))
@pytest.mark.parametrize("estimator, adaptive", METHODS, ids=IDS)
def test_the_mean_step_points_down_the_gradient(estimator, adaptive, kind):
    """STEPS steps of PROBES probes, each from the same θ (reset after each step, the adaptive state carried as in a
    run): the mean update must point along -∇L.

    Tolerance: cosine > 0.9. For SPSA one probe's estimate ⟨∇L, z⟩z is unbiased with covariance ≈ ‖∇L‖²·I (+∇L∇L^T),
    so the mean of N = STEPS·PROBES = 1,600 of them is ∇L plus noise of squared norm ≈ (d + 1)/N·‖∇L‖² with
    d = 136: 0.086‖∇L‖², an expected cosine of 1/√1.086 ≈ 0.96. A cosine under 0.9 needs that noise at 0.23‖∇L‖²,
    2.7 times its mean; a sum of ~d independent squares (χ²_d/d has std √(2/d) = 0.12) gets there with probability
    far below 1e-6. FZOO's one-sided difference adds ε/2·z^T A z, even in z, whose contribution to the mean
    vanishes by symmetry, and its per-step 1/σ (and scalar_rms's per-step scale) only reweights the steps; both
    leave the estimate within the same margin. The seeds are fixed, so the test is deterministic anyway; measured
    over 15 other run seeds per method: means 0.948-0.962, standard deviations <= 0.006, minimum 0.935, so 0.9
    is over 6 standard deviations below every method's mean. (MEAZO's square-of-the-mean moment failed this:
    cosines down to 0.23, see :mod:`sglang_mezo.core.estimators`.)"""
    params, tensors, loss, grad = quadratic()
    config = MezoConfig(lr=1e-2, eps=1e-3, n_probes=PROBES, z_kind=kind, estimator=estimator, adaptive=adaptive,
                        total_steps=STEPS, seed=11)
    states = [AdaptiveState()]  # the rule's state carries from step to step; the weights do not
    mean = mean_step(tensors, STEPS, lambda k: states.append(run_step(params, config, k, loss,
                                                                      state=states[-1]).adaptive))
    state = states[-1]
    cosine = float(torch.nn.functional.cosine_similarity(-mean, grad, dim=0))
    assert cosine > 0.9, cosine
    assert state.updates == (STEPS if adaptive is Adaptive.SCALAR_RMS else 0)
    if (estimator, adaptive) == (Estimator.GREEDY, Adaptive.NONE):
        # the best of PROBES probes: along ∇L the mean step is lr·E[max_k x_k²]·∇L (x_k ~ N(0, 1), each probe's
        # cosine with ∇L times √d), E[max of 4 χ²₁] ≈ 2.5 for Gaussian z (measured here: 2.48 Gaussian, 2.36
        # Rademacher); a random pick of the pool would give 1. Bounds 1.8-3.5: the selection must be doing its job
        along = float(-mean @ grad) / float(grad @ grad)
        assert 1.8 < along / config.lr < 3.5
    if (estimator, adaptive) == (Estimator.SPSA, Adaptive.NONE):
        # and unbiased: the mean step is -lr·∇L. Its component along ∇L has relative std √(2/N) = 0.035 (each
        # probe's is ‖∇L‖·⟨z, ∇L/‖∇L‖⟩², a χ²₁ of variance 2): ±15 % is over 4 standard deviations
        along = float(-mean @ grad) / float(grad @ grad)
        assert along / config.lr == pytest.approx(1.0, abs=0.15)


def test_fzoo_normalises_the_step_by_the_spread_of_the_losses():
    """The step does not depend on the scale of the loss, nor, to first order, on ε: a normalised-SGD step. (The
    one-sided difference also holds ε/2·z^T A z, the same for every Rademacher z and not removed by σ: here about
    5 % of L_k - L0 at ε = 1e-3, so halving ε moves the coefficients by a few percent.)"""
    steps = []
    for scale, eps in [(1.0, 1e-3), (1000.0, 1e-3), (1.0, 5e-4)]:
        params, _, loss, _ = quadratic()
        before = scale * loss()
        result = run_step(params, MezoConfig(lr=1e-2, eps=eps, n_probes=8, estimator="fzoo", z_kind="rademacher"),
                          0, lambda loss=loss, scale=scale: scale * loss())
        steps.append(result.update)
        assert result.loss == result.loss_minus[0] == before  # FZOO scores the committed weights themselves
    assert steps[1] == pytest.approx(steps[0], rel=1e-6)
    assert steps[2] == pytest.approx(steps[0], rel=0.1)


# -- cost -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", list(Estimator))
def test_forwards_and_passes_per_step(estimator, monkeypatch):
    """SPSA and greedy: 2n forwards and 2n + 1 passes; FZOO: n + 1 of each (each probe pass takes the previous probe
    off, the commit takes the last one off)."""
    passes = []
    monkeypatch.setattr(params_module, "zaxpy_", lambda *a, **k: passes.append(1) or zaxpy_(*a, **k))
    params, _, loss, _ = quadratic()
    calls = []
    n = 5
    spsa.mezo_step(params, lambda: calls.append(1) or loss(), list(range(n)), eps=1e-3, lr=1e-2,
                   estimator=estimator)
    assert len(calls) == estimator.forwards(n) == (n + 1 if estimator is Estimator.FZOO else 2 * n)
    assert len(passes) == len(estimator.probe_states(range(n), 1e-3)) + 1


# -- the default is MeZO's step, bit for bit --------------------------------------------------------------------------


def mezo_reference(targets, loss, seeds: list[int], *, eps: float, lr: float, weight_decay: float,
                   kind: ZKind) -> None:
    """MeZO's step as the code made it before the estimators existed, pass by pass: +εz_1 on, then -2εz_1, then
    +εz_1 (off) with +εz_2 (on), …, then the commit pass taking -εz_n off and adding -lr·g_k/n·z_k."""
    grads, previous = [], None
    for seed in seeds:
        if previous is None:
            zaxpy_(targets, [seed], [eps], kind=kind)
        else:
            zaxpy_(targets, [previous, seed], [eps, eps], kind=kind)
        plus = float(loss())
        zaxpy_(targets, [seed], [-eps - eps], kind=kind)
        minus = float(loss())
        grads.append((plus - minus) / (2 * eps))
        previous = seed
    n = len(seeds)
    zaxpy_(targets, seeds, [0.0] * (n - 1) + [eps], [-lr * g / n for g in grads], decay=1.0 - lr * weight_decay,
           kind=kind)


@pytest.mark.parametrize("kind", list(ZKind))
def test_the_default_config_is_mezos_step_bit_for_bit(kind):
    params, tensors, loss, _ = quadratic()
    config = MezoConfig(lr=0.05, weight_decay=0.3, n_probes=3, z_kind=kind, schedule=LRSchedule.COSINE,
                        total_steps=5, seed=5)
    assert (config.estimator, config.adaptive) == (Estimator.SPSA, Adaptive.NONE)  # the defaults
    copies = {n: t.clone() for n, t in tensors.items()}
    reference = TrainableSet.from_pieces([TrainablePiece(n, t, tuple(t.shape)) for n, t in copies.items()])

    def reference_loss() -> float:
        swapped = {n: t.clone() for n, t in tensors.items()}
        for n, t in tensors.items():
            t.copy_(copies[n])
        try:
            return loss()
        finally:
            for n, t in tensors.items():
                t.copy_(swapped[n])

    run = MezoRun(params, config)
    for step in range(config.total_steps):
        result = run.step(loss)
        mezo_reference(reference.targets, reference_loss, seeds_for(config, step), eps=config.eps,
                       lr=config.lr_at(step), weight_decay=config.weight_decay, kind=kind)
        for n, t in tensors.items():
            assert torch.equal(t, copies[n]), (step, n)
        assert result.update == tuple(-result.lr * g / 3 for g in result.projected_grads)
    # a default run's log is written as before v3: no update coefficients (derived on reading, as the run did)
    assert run.trajectory.to_dict()["steps"]["update"] == [None] * config.total_steps


# -- replay on a tiny model -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator, adaptive", METHODS, ids=IDS)
def test_each_method_replays_bit_identically(estimator, adaptive, tmp_path):
    """A run with failed steps on the way (a scorer error, a NaN): the saved trajectory, replayed onto the base
    weights, gives the trained weights bit for bit, and reads back as the records it was written from."""
    config = MezoConfig(lr=1e-3, eps=1e-3, weight_decay=0.1, n_probes=3, z_kind=ZKind.RADEMACHER, total_steps=6,
                        seed=77, schedule=LRSchedule.COSINE, estimator=estimator, adaptive=adaptive)
    engine = HFEngine(tiny_llama(5))
    params = TrainableSet.from_pieces(engine.trainable_pieces(), config.selection, engine.num_layers)
    run = MezoRun(params, config)
    score = batch_loss_fn(engine, Objective.CROSS_ENTROPY, memorisation_task())
    flaky = FlakyLoss(score, {1: 3, 3: -4, 5: 1})  # attempt -> the loss call that raises (negative: returns NaN)
    train_through_failures(run, flaky)
    # SPSA: calls are L+_1, L-_1, L+_2, L-_2 (NaN, checked after the pair: 4 passes); FZOO: L0, L_1, L_2, L_3. A
    # failure at FZOO's L0 (call 1) made no pass, so it leaves no record.
    expected = [2, 3] if estimator is Estimator.FZOO else [3, 4, 1]
    assert [r.aborted_passes for r in run.trajectory if not r.committed] == expected
    assert run.state.updates == (config.total_steps if adaptive is Adaptive.SCALAR_RMS else 0)

    path = run.trajectory.save(tmp_path / "run.json.gz")
    loaded = Trajectory.load(path)
    assert loaded.records == run.trajectory.records
    replayed_engine = HFEngine(tiny_llama(5))
    replayed_params = TrainableSet.from_pieces(replayed_engine.trainable_pieces(), config.selection,
                                               replayed_engine.num_layers)
    assert loaded.replay(replayed_params) == config.total_steps
    for (name, p), q in zip(engine.model.named_parameters(), replayed_engine.model.parameters(), strict=True):
        assert torch.equal(p, q), f"exact replay differs in {name}"


def test_a_version_2_log_still_replays(tmp_path):
    """v2 had no estimator or update columns: its steps read as SPSA with MeZO's update, replayed bit for bit."""
    config = MezoConfig(lr=1e-3, n_probes=2, z_kind=ZKind.RADEMACHER, total_steps=3, seed=9)
    engine = HFEngine(tiny_llama(5))
    run = MezoRun(TrainableSet.from_pieces(engine.trainable_pieces()), config)
    score = batch_loss_fn(engine, Objective.CROSS_ENTROPY, memorisation_task())
    for _ in range(config.total_steps):
        run.step(score)
    data = run.trajectory.to_dict()
    data["format_version"] = 2
    del data["steps"]["estimator"], data["steps"]["update"]
    old = Trajectory.from_dict(data)
    assert old.records == run.trajectory.records
    other = HFEngine(tiny_llama(5))
    old.replay(TrainableSet.from_pieces(other.trainable_pieces()))
    for p, q in zip(engine.model.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(p, q)


# -- a job, chunk by chunk --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator, adaptive", [(Estimator.FZOO, Adaptive.SCALAR_RMS),
                                                 (Estimator.SPSA, Adaptive.SCALAR_RMS)], ids=["fzoo", "spsa"])
def test_a_job_carries_the_adaptive_state_across_chunks(estimator, adaptive, tmp_path):
    """The job runner sends one step per chunk here: each chunk continues from the state the previous one ended
    in, so the job's steps are those of one uninterrupted run; the journal reads them back, and replaying them
    gives the served weights."""
    examples = tuple(memorisation_task(n=4, seed=3))
    config = MezoConfig(lr=1e-3, n_probes=2, z_kind=ZKind.RADEMACHER, total_steps=5, seed=21, estimator=estimator,
                        adaptive=adaptive)
    spec = JobSpec(examples=examples, objective=Objective.CROSS_ENTROPY, config=config, batch_size=2)
    tiny_llama(0).save_pretrained(tmp_path / "base")  # the fake executor's model

    async def main():
        journal = Journal(tmp_path / "state")
        state = journal.open(str(tmp_path / "base"), "default")
        executor = FakeExecutor()
        runner = JobRunner(executor, FakeScorer(executor), yield_s=0.0, chunk_target_s=0.0, journal=journal,
                           journaled=state, base_weight_version=state.base_weight_version)
        job = runner.submit(spec)
        await job.done.wait()
        return executor, job

    executor, job = asyncio.run(main())
    assert [len(steps) for steps in executor.chunks] == [1] * config.total_steps

    direct = FakeExecutor()
    run = MezoRun(direct.params(config.selection), config)
    results = [run.step(batch_loss_fn(direct.engine, Objective.CROSS_ENTROPY, spec.batches((step,))[0]))
               for step in range(config.total_steps)]
    assert [r.result for r in job.reports] == results
    assert job.reports[-1].result.adaptive.updates == config.total_steps

    entry = read(tmp_path / "state" / JOURNAL).jobs[job.id]
    assert entry.reports == job.reports and entry.trajectory.records == job.trajectory.records
    served, again = executor.weights(), replayed(executor, [entry.trajectory])
    assert all(torch.equal(served[n], again[n]) for n in served)

