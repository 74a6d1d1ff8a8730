"""A MeZO step whose probes are scored together: each probe direction written into a copy of the weights of its own,
every copy scored by one batched forward, the truth (an fp32 master) moved only by the commit.

This is the step for weights that an engine can hold several versions of at once and score side by side in one
batch: LoRA adapters in SGLang's pool, where a request names its slot. Against :func:`.spsa.mezo_step`, which moves
one set of weights in place, probe by probe:

- the 2n forwards of a step (n + 1 for FZOO) become one forward over 2n copies, however the engine batches them;
- the master is never perturbed: a probe is written as copy_j ← round(master + c·z_k), so a failure anywhere before
  the commit leaves the weights exactly at the last committed step, and there is no aborted probe to record;
- the commit is the plain fp32 update master ← master·d + Σ_k u_k z_k, so an update-only replay of the recorded
  coefficients onto the same starting master is the training run, bit for bit (:func:`replay_updates`).

z is keyed by the master's tensor names (the set's :class:`~.params.TrainablePiece` names), never by where a copy
sits, so a copy in any slot, at any padded rank, perturbs the same elements with the same z.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sglang_mezo.kernels import PassTargets, ZKind, ZTarget, as_block, zaxpy_

from .config import MezoConfig
from .estimators import (
    INITIAL_STATE,
    AdaptiveState,
    Estimator,
    ScalarRMS,
    update_coefficients,
)
from .params import TrainableSet
from .run import seeds_for
from .spsa import InconsistentWeightsError, NonFiniteLossError, StepResult, checked_step, sigint_deferred

CopyScorer = Callable[[Sequence[int]], Sequence[float]]
"""Scores the step's batch under each of the given copies (in the order given) and returns one mean loss per copy."""


@dataclass
class ProbeCopies:
    """An fp32 trainable set (the master: the truth, trained in place) and copies of its storage, each a list of
    tensors aligned with the master's pieces (same shapes, any dtype, unit stride along the last dimension)."""

    master: TrainableSet
    copies: list[list[torch.Tensor]]
    _targets: dict[int, PassTargets] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.master.masters is not None:
            raise ValueError("the master of probe copies is itself the fp32 truth: it takes no masters")
        for piece in self.master.pieces:
            if piece.data.dtype != torch.float32:
                raise ValueError(f"master piece {piece.name} is {piece.data.dtype}, not float32")
        for j, copy in enumerate(self.copies):
            if [tuple(t.shape) for t in copy] != [tuple(p.data.shape) for p in self.master.pieces]:
                raise ValueError(f"copy {j} does not have the master's pieces' shapes")

    def _copy_targets(self, j: int) -> PassTargets:
        if j not in self._targets:
            self._targets[j] = PassTargets([
                ZTarget(theta=as_block(theta), where=t.where, decay=t.decay, master=as_block(p.data))
                for theta, t, p in zip(self.copies[j], self.master.targets, self.master.pieces, strict=True)
            ])
        return self._targets[j]

    def write(self, j: int, seeds: Sequence[int] = (), coefficients: Sequence[float] = (), *,
              kind: ZKind = ZKind.GAUSSIAN) -> None:
        """copy_j ← round(master + Σ_k c_k·z(seed_k)); with no seeds, copy_j ← round(master). The master is read
        only."""
        targets = self._copy_targets(j)
        if not seeds:
            with torch.no_grad():
                for t in targets:
                    t.theta.copy_(t.master)
            return
        zaxpy_(targets, list(seeds), list(coefficients), kind=kind, commit=False)

    def commit(self, seeds: Sequence[int], update: Sequence[float], *, decay: float, kind: ZKind) -> None:
        """master ← master·decay + Σ_k u_k·z(seed_k), in fp32 (the plain pass; decay skips biases and norms). A pass
        that fails part-way raises :class:`~.spsa.InconsistentWeightsError`."""
        with sigint_deferred():
            try:
                self.master.apply(list(seeds), [0.0] * len(seeds), list(update), decay=decay, kind=kind)
            except BaseException as exc:
                raise InconsistentWeightsError("the commit to the master failed part-way") from exc


def probe_plan(estimator: Estimator, seeds: Sequence[int], eps: float) -> list[tuple[tuple[int, ...], float]]:
    """The probe copies of a step, in the order they are scored: (seeds, coefficient) per copy. SPSA: +εz_1, -εz_1,
    +εz_2, …; FZOO: the master itself (no seed), then +εz_1, +εz_2, …"""
    if Estimator(estimator).two_sided:
        return [((s,), sign * eps) for s in seeds for sign in (1.0, -1.0)]
    return [((), 0.0)] + [((s,), eps) for s in seeds]


def copies_needed(config: MezoConfig) -> int:
    """How many probe copies a step of ``config`` scores at once."""
    return config.estimator.forwards(config.n_probes)


def slot_step(
    copies: ProbeCopies,
    score: CopyScorer,
    seeds: Sequence[int],
    *,
    eps: float,
    lr: float,
    weight_decay: float = 0.0,
    kind: ZKind = ZKind.GAUSSIAN,
    estimator: Estimator = Estimator.SPSA,
    adaptive: ScalarRMS | None = None,
    state: AdaptiveState = INITIAL_STATE,
) -> StepResult:
    """One MeZO step with every probe in a copy of its own, scored by one call of ``score``; the same
    :class:`~.spsa.StepResult` as :func:`~.spsa.mezo_step`. On any exception before the commit the master is
    untouched (the copies hold probes, which nothing serves)."""
    seeds, estimator = checked_step(seeds, estimator, eps=eps, lr=lr, weight_decay=weight_decay)
    if not 0.0 < 1.0 - lr * weight_decay <= 1.0:
        raise ValueError(f"lr * weight_decay must be in [0, 1), got {lr} * {weight_decay}")
    plan = probe_plan(estimator, seeds, eps)
    if len(plan) > len(copies.copies):
        raise ValueError(f"a {estimator.value} step of {len(seeds)} probes needs {len(plan)} copies, "
                         f"there are {len(copies.copies)}")
    for j, (probe_seeds, coefficient) in enumerate(plan):
        copies.write(j, probe_seeds, (coefficient,) * len(probe_seeds), kind=kind)
    losses = [float(x) for x in score(range(len(plan)))]  # host sync
    if len(losses) != len(plan):
        raise RuntimeError(f"the scorer returned {len(losses)} losses for {len(plan)} copies")
    if not all(math.isfinite(x) for x in losses):
        raise NonFiniteLossError(f"non-finite probe loss: {losses}")
    if estimator.two_sided:
        loss_plus, loss_minus = losses[0::2], losses[1::2]
    else:
        loss_plus, loss_minus = losses[1:], [losses[0]] * len(seeds)
    direction = estimator.direction(loss_plus, loss_minus, eps)
    update, state_after = update_coefficients(direction, lr=lr, rule=adaptive, state=state)
    if not all(math.isfinite(u) for u in update):
        raise NonFiniteLossError(f"refusing an update that is not finite: {update}")
    copies.commit(seeds, update, decay=1.0 - lr * weight_decay, kind=kind)
    return StepResult(seeds=seeds, loss_plus=tuple(loss_plus), loss_minus=tuple(loss_minus),
                      projected_grads=direction.projected_grads, lr=lr, weight_decay=weight_decay, eps=eps,
                      estimator=estimator, update=update, adaptive=state_after)


def run_slot_step(copies: ProbeCopies, config: MezoConfig, step: int, score: CopyScorer, *,
                  state: AdaptiveState = INITIAL_STATE) -> StepResult:
    """Step ``step`` of a run with ``config`` (its seeds, scheduled lr and rules), probes scored together."""
    if config.z_rank or config.tensor_scales:  # the copies are written along dense, unscaled z
        raise ValueError("z_rank and tensor_scale apply to the served weights, not to an adapter's copies")
    return slot_step(copies, score, seeds_for(config, step), eps=config.eps, lr=config.lr_at(step),
                     weight_decay=config.weight_decay, kind=config.z_kind, estimator=config.estimator,
                     adaptive=config.adaptive_rule, state=state)


def replay_updates(master: TrainableSet, records: Sequence, *, kind: ZKind) -> int:
    """Apply recorded steps' updates (``StepRecord`` s; aborted ones, which moved nothing, are skipped) to an fp32
    set: the exact training arithmetic of :func:`slot_step`'s commits. Returns the steps applied."""
    applied = 0
    for record in records:
        if record.committed:
            master.apply(list(record.seeds), [0.0] * len(record.seeds), list(record.update),
                         decay=1.0 - record.lr * record.weight_decay, kind=kind)
            applied += 1
    return applied
