"""The step whose probes are scored together (core.probes): what each copy holds, that it measures and moves what the
one-at-a-time step does, that nothing before the commit touches the master, and that the updates replay exactly."""

from __future__ import annotations

import pytest
import torch

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.estimators import INITIAL_STATE, Adaptive, Estimator
from sglang_mezo.core.params import TrainablePiece, TrainableSet
from sglang_mezo.core.probes import ProbeCopies, copies_needed, probe_plan, replay_updates, run_slot_step, slot_step
from sglang_mezo.core.spsa import NonFiniteLossError, mezo_step
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.kernels import ZKind, ZSlice, materialize_z, tensor_key

SHAPES = {"layers.0.q_proj.lora_A.weight": (4, 24), "layers.0.q_proj.lora_B.weight": (24, 4),
          "layers.0.norm.weight": (24,)}


def master_set(seed: int = 0) -> TrainableSet:
    gen = torch.Generator().manual_seed(seed)
    pieces = [TrainablePiece(n, torch.randn(s, generator=gen) * 0.1, s) for n, s in SHAPES.items()]
    return TrainableSet.from_pieces(pieces)


def with_copies(master: TrainableSet, n: int, dtype=torch.float32) -> ProbeCopies:
    return ProbeCopies(master, [[torch.zeros(p.data.shape, dtype=dtype) for p in master.pieces] for _ in range(n)])


def quadratic(copies: ProbeCopies):
    """L = ½‖w − 0.05‖² per copy, in float64; records which copies each call scored."""
    calls: list[list[int]] = []

    def score(which):
        which = list(which)
        calls.append(which)
        return [0.5 * sum(float(((t.double() - 0.05) ** 2).sum()) for t in copies.copies[j]) for j in which]

    return score, calls


def z_of(name: str, shape, seed: int, kind: ZKind) -> torch.Tensor:
    cols = shape[-1]
    return materialize_z(seed, ZSlice(tensor_key(name), cols), (int(torch.tensor(shape).prod()) // cols, cols),
                         kind).view(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(ZKind))
def test_a_copy_holds_the_rounded_probe_and_the_master_is_read_only(dtype, kind):
    master = master_set()
    before = [p.data.clone() for p in master.pieces]
    copies = with_copies(master, 2, dtype)
    copies.write(1, (7,), (1e-3,), kind=kind)
    for piece, copy, old in zip(master.pieces, copies.copies[1], before, strict=True):
        assert torch.equal(piece.data, old)
        expected = (old + 1e-3 * z_of(piece.name, piece.full_shape, 7, kind)).to(dtype)
        torch.testing.assert_close(copy, expected, atol=0, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6)
    copies.write(0)
    assert all(torch.equal(c, p.data.to(dtype)) for c, p in zip(copies.copies[0], master.pieces, strict=True))


@pytest.mark.parametrize("estimator", list(Estimator))
def test_probes_together_measure_and_move_as_one_at_a_time(estimator):
    """The same step, its probes in 2n copies scored in one call, against mezo_step moving an fp32 copy of the master
    probe by probe: losses within 1e-5, update coefficients the same to rounding, the weights after too."""
    seeds = (11, 12, 13)
    master = master_set()
    inplace = TrainableSet.from_pieces([TrainablePiece(p.name, p.data.clone(), p.full_shape) for p in master.pieces])
    copies = with_copies(master, copies_needed(MezoConfig(n_probes=3, estimator=estimator)))
    score, calls = quadratic(copies)
    together = slot_step(copies, score, seeds, eps=1e-3, lr=0.05, weight_decay=0.1, estimator=estimator)
    assert calls == [list(range(len(probe_plan(estimator, seeds, 1e-3))))]  # every probe in one scoring call

    def loss() -> float:
        return 0.5 * sum(float(((p.data.double() - 0.05) ** 2).sum()) for p in inplace.pieces)

    alone = mezo_step(inplace, loss, seeds, eps=1e-3, lr=0.05, weight_decay=0.1, estimator=estimator)
    for ours, theirs in ((together.loss_plus, alone.loss_plus), (together.loss_minus, alone.loss_minus)):
        assert ours == pytest.approx(theirs, abs=1e-5)
    assert together.update == pytest.approx(alone.update, rel=1e-3, abs=1e-7)
    for a, b in zip(master.pieces, inplace.pieces, strict=True):
        torch.testing.assert_close(a.data, b.data, atol=1e-6, rtol=0)


class Broken(RuntimeError):
    pass


@pytest.mark.parametrize("failure", ["raise", "nan", "short"])
def test_nothing_before_the_commit_moves_the_master(failure):
    master = master_set()
    before = [p.data.clone() for p in master.pieces]
    copies = with_copies(master, 2)

    def score(which):
        if failure == "raise":
            raise Broken("the forward failed")
        return [float("nan")] * len(which) if failure == "nan" else [1.0]

    with pytest.raises((Broken, NonFiniteLossError, RuntimeError)):
        slot_step(copies, score, (5,), eps=1e-3, lr=0.1)
    assert all(torch.equal(p.data, b) for p, b in zip(master.pieces, before, strict=True))


def test_a_step_that_needs_more_copies_than_there_are_is_refused():
    copies = with_copies(master_set(), 3)
    score, calls = quadratic(copies)
    with pytest.raises(ValueError, match="needs 4 copies"):
        slot_step(copies, score, (1, 2), eps=1e-3, lr=0.1)
    assert calls == []


@pytest.mark.parametrize("config", [
    MezoConfig(lr=0.05, n_probes=2, z_kind=ZKind.RADEMACHER, weight_decay=0.1),
    MezoConfig(lr=0.01, n_probes=3, estimator=Estimator.FZOO, adaptive=Adaptive.SCALAR_RMS),
], ids=["spsa-rademacher-decay", "fzoo-scalar-rms"])
def test_the_recorded_updates_replay_onto_the_starting_master_bit_for_bit(config):
    master = master_set(3)
    start = [p.data.clone() for p in master.pieces]
    copies = with_copies(master, copies_needed(config), torch.bfloat16)
    score, _ = quadratic(copies)
    trajectory = Trajectory.for_params(master, config.z_kind, config=config.to_dict())
    state = INITIAL_STATE
    for step in range(4):
        result = run_slot_step(copies, config, step, score, state=state)
        trajectory.append(step, result)
        state = result.adaptive
    fresh = TrainableSet.from_pieces([TrainablePiece(p.name, s.clone(), p.full_shape)
                                      for p, s in zip(master.pieces, start, strict=True)])
    assert replay_updates(fresh, Trajectory.from_dict(trajectory.to_dict()).records, kind=config.z_kind) == 4
    assert all(torch.equal(a.data, b.data) for a, b in zip(master.pieces, fresh.pieces, strict=True))
    assert not all(torch.equal(p.data, s) for p, s in zip(master.pieces, start, strict=True))


def test_copies_must_match_an_fp32_master():
    master = master_set()
    with pytest.raises(ValueError, match="shapes"):
        ProbeCopies(master, [[torch.zeros(1)]])
    half = TrainableSet.from_pieces([TrainablePiece("w", torch.zeros(3, 3, dtype=torch.bfloat16), (3, 3))])
    with pytest.raises(ValueError, match="float32"):
        ProbeCopies(half, [])
