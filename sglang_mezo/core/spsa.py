"""The MeZO step: n probes, in place, z never stored; two-sided SPSA by default, or FZOO's one-sided probes.

For probes k = 1..n with seeds s_k:  θ += εz_k;  L+_k = L(θ);  θ -= 2εz_k;  L-_k = L(θ);  g_k = (L+_k - L-_k)/(2ε)
and then, in the same pass that takes the last probe off,  θ ← (1 - lr·wd)·θ - lr·Σ_k (g_k/n)·z_k  (no decay on
biases and norms). Consecutive probes share a pass (undo probe k and apply probe k+1 together), so a step reads
and writes the weights 2n + 1 times and needs no memory beyond one kernel tile. With ``estimator=fzoo`` the step
scores θ itself first, then θ + εz_1, θ + εz_2, … (each pass takes one probe off and puts the next on), and the
commit pass takes the last probe off: n + 1 passes, n + 1 forwards. How the losses become the update coefficients
(and the optional adaptive step size) is :mod:`.estimators`'s arithmetic; this module moves the weights.

The weights are always in one of two states: *committed* (after a completed step) or *perturbed by exactly the
probe recorded in* :class:`_Probe`. Whatever goes wrong while perturbed (a scoring error, a non-finite loss,
KeyboardInterrupt), the probe is taken off before the exception leaves this module. A pass over the weights is
the unit of change: Ctrl-C is held until the pass in progress has finished and been recorded, and a pass that
itself fails part-way raises :class:`InconsistentWeightsError` (its tensors are partly moved, which no undo can
know) rather than "restoring" from a state the weights are not in.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from sglang_mezo.kernels import ZKind, check_seed

from .estimators import (
    INITIAL_STATE,
    AdaptiveState,
    Estimator,
    ScalarRMS,
    sgd_update,
    update_coefficients,
)
from .params import TrainableSet

LossFn = Callable[[], float]
"""Scores the step's batch under the weights as they are now and returns the mean loss (a host sync)."""
Reduce = Callable[[Sequence[float], Sequence[float]], tuple[Sequence[float], Sequence[float]]]
"""Turns one shard's (L+, L-) per probe into the whole batch's (every replica's, combined: :mod:`.shards`)."""


class NonFiniteLossError(RuntimeError):
    """A probe's loss was NaN or infinite; the weights were left at the last committed step."""


class InconsistentWeightsError(RuntimeError):
    """A pass over the weights failed part-way: some tensors moved and some did not. Recover by reloading the base
    weights and replaying the trajectory's committed steps."""


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) until the block ends, then deliver it. Only the main thread receives signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[-1])  # the default handler raises KeyboardInterrupt here
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


@dataclass(frozen=True)
class StepResult:
    """What one step measured and applied. The fields after ``eps`` came later, with defaults, so that results
    made before them (journals, messages) still read: such a result is an SPSA step with MeZO's update."""

    seeds: tuple[int, ...]
    loss_plus: tuple[float, ...]
    """L(θ + εz_k) per probe."""
    loss_minus: tuple[float, ...]
    """L(θ - εz_k) per probe (SPSA); for a one-sided estimator (FZOO), the loss each probe is differenced against,
    L(θ), repeated per probe, so that L+_k - L-_k is every estimator's probe difference."""
    projected_grads: tuple[float, ...]
    lr: float
    """The scheduled learning rate (before any adaptive scaling, which :attr:`update` includes)."""
    weight_decay: float
    eps: float
    estimator: Estimator = Estimator.SPSA
    update: tuple[float, ...] = ()
    """u_k, the coefficient of z_k in the committed update (θ ← θ·(1 - lr·wd) + Σ_k u_k z_k), exactly as applied;
    empty in a result made before it was recorded (see :attr:`applied_update`)."""
    adaptive: AdaptiveState = INITIAL_STATE
    """The adaptive step size's state after this step (the initial state when the run has none)."""

    @property
    def applied_update(self) -> tuple[float, ...]:
        return self.update or sgd_update(self.projected_grads, self.lr)

    @property
    def loss(self) -> float:
        """The step's loss estimate at the committed weights: the mean of all L+ and L- (SPSA), or L(θ) itself,
        which FZOO measures."""
        if self.estimator is Estimator.FZOO:
            return self.loss_minus[0]
        return (sum(self.loss_plus) + sum(self.loss_minus)) / (2 * len(self.seeds))

    @property
    def zero_grad_probes(self) -> int:
        """Probes whose L+ equalled L- exactly (the usual outcome for a piecewise-constant objective)."""
        return sum(1 for g in self.projected_grads if g == 0.0)


@dataclass(frozen=True)
class AbortedProbes:
    """What a step that failed after perturbing did to the weights: its first ``passes`` probe moves (+ε z_1,
    -ε z_1, +ε z_2, …), then one pass taking the last of them off. The weights are back at the committed step up to
    the fp32 rounding of that round trip; :func:`replay_aborted` repeats it bit for bit, so a trajectory that
    records it stays an exact description of the weights. (FZOO's probes are +ε z_1, +ε z_2, ….)"""

    seeds: tuple[int, ...]
    eps: float
    passes: int
    estimator: Estimator = Estimator.SPSA
    """Which probes the passes were: ±εz_k in turn (SPSA) or +εz_1, +εz_2, … (FZOO)."""


class _Probe:
    """The perturbation currently applied to the weights, so that it can always be taken off again."""

    def __init__(self, params: TrainableSet, kind: ZKind) -> None:
        self.params = params
        self.kind = kind
        self.seed: int | None = None
        self.scale = 0.0
        self.broken = False
        self.moves = 0

    @contextlib.contextmanager
    def pass_over_weights(self) -> Iterator[None]:
        """One pass: not interrupted by Ctrl-C half-way; if it raises, the weights are at no recorded state."""
        with sigint_deferred():
            try:
                yield
            except BaseException as exc:
                self.broken = True
                raise InconsistentWeightsError(
                    "a pass over the weights failed part-way; reload the base weights and replay the trajectory"
                ) from exc

    def move(self, seed: int, scale: float) -> None:
        """Go from the current probe to (seed, scale) in one pass over the weights."""
        if self.seed is None:
            seeds, coefs = [seed], [scale]
        elif self.seed == seed:
            seeds, coefs = [seed], [scale - self.scale]
        else:
            seeds, coefs = [self.seed, seed], [-self.scale, scale]
        with self.pass_over_weights():
            self.params.apply(seeds, coefs, kind=self.kind)
            self.seed, self.scale = seed, scale
            self.moves += 1

    def take_off(self) -> None:
        """Back to the committed weights (in fp32, to within a rounding of the round trip)."""
        if self.seed is not None and not self.broken:
            with self.pass_over_weights():
                self.params.apply([self.seed], [-self.scale], kind=self.kind)
                self.seed, self.scale = None, 0.0


def checked_step(seeds: Sequence[int], estimator: Estimator, *, eps: float, lr: float,
                 weight_decay: float) -> tuple[tuple[int, ...], Estimator]:
    """A step's seeds and estimator, checked with its constants before anything moves (ValueError otherwise)."""
    if not seeds:
        raise ValueError("a step needs at least one probe seed")
    seeds = tuple(check_seed(s) for s in seeds)
    estimator = Estimator(estimator)
    if len(seeds) < estimator.min_probes:
        raise ValueError(f"a {estimator.value} step needs at least {estimator.min_probes} probes, got {len(seeds)}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a non-negative finite number, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay}")
    return seeds, estimator


def mezo_step(
    params: TrainableSet,
    loss_fn: LossFn,
    seeds: Sequence[int],
    *,
    eps: float,
    lr: float,
    weight_decay: float = 0.0,
    kind: ZKind = ZKind.GAUSSIAN,
    estimator: Estimator = Estimator.SPSA,
    adaptive: ScalarRMS | None = None,
    state: AdaptiveState = INITIAL_STATE,
    on_abort: Callable[[AbortedProbes], None] | None = None,
    before_pass: Callable[[], None] | None = None,
    reduce: Reduce | None = None,
) -> StepResult:
    """Run one MeZO step on ``params`` in place and return what it measured.

    ``loss_fn`` is called 2n times (n = len(seeds); n + 1 times for FZOO); each call must score the *same* batch.
    ``adaptive`` (with ``state``, the rule's state after the previous step) scales the step, see
    :mod:`.estimators`. On any exception the weights are returned to where they were before the step and the
    exception propagates; a non-finite loss raises :class:`NonFiniteLossError` the same way. Nothing is applied
    unless every probe succeeded. Before such an exception leaves, ``on_abort`` (if given) receives the probe
    passes that were applied and taken off, so a trajectory can record them (see :class:`AbortedProbes`).
    ``before_pass`` (if given) runs before every pass over the weights, the commit included; an exception from it
    aborts the step like any other (engines whose processes must move in lockstep agree there).

    With ``reduce`` (a shard of a data-parallel step), ``loss_fn`` scores this replica's shard: the last probe is
    taken off in a pass of its own, the weights are at the committed step while ``reduce`` waits for the other
    replicas, and the commit applies the update alone (:func:`replay_step` with ``probes_off`` repeats this).
    """
    seeds, estimator = checked_step(seeds, estimator, eps=eps, lr=lr, weight_decay=weight_decay)
    probe = _Probe(params, kind)
    sync = before_pass or (lambda: None)
    try:
        if estimator.two_sided:
            loss_plus, loss_minus = _probe_two_sided(probe, loss_fn, seeds, eps, sync)
        else:
            loss_plus, base = _probe_one_sided(probe, loss_fn, seeds, eps, sync)
            loss_minus = (base,) * len(seeds)
        if reduce is not None:
            sync()
            probe.take_off()
            sync()  # a replica whose take-off failed says so here, before anyone waits in the reduction
            loss_plus, loss_minus = (tuple(v) for v in reduce(loss_plus, loss_minus))
        direction = estimator.direction(loss_plus, loss_minus, eps)
        update, state_after = update_coefficients(direction, lr=lr, rule=adaptive, state=state)
        # -- commit: take the last probe off and apply the update, one pass ------------------------------------
        if not all(math.isfinite(u) for u in update) or not 0.0 < 1.0 - lr * weight_decay <= 1.0:
            raise NonFiniteLossError(f"refusing an update that is not finite or decays past zero: lr={lr}, "
                                     f"weight_decay={weight_decay}, projected gradients={direction.projected_grads}")
        sync()
        with probe.pass_over_weights():
            apply_update(params, seeds, update, decay=1.0 - lr * weight_decay, kind=kind, take_off=-probe.scale)
            probe.seed = None  # the commit pass took it off
    except BaseException:
        probe.take_off()  # raises InconsistentWeightsError if it cannot: then there is no state to describe
        if on_abort is not None and probe.moves and not probe.broken:
            on_abort(AbortedProbes(seeds=seeds, eps=eps, passes=probe.moves, estimator=estimator))
        raise
    return StepResult(
        seeds=seeds,
        loss_plus=tuple(loss_plus),
        loss_minus=tuple(loss_minus),
        projected_grads=direction.projected_grads,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        estimator=estimator,
        update=update,
        adaptive=state_after,
    )


def _probe_two_sided(probe: _Probe, loss_fn: LossFn, seeds: tuple[int, ...], eps: float,
                     sync: Callable[[], None]) -> tuple[list[float], list[float]]:
    """SPSA's probes: +εz_k then -εz_k for each k, one pass each; leaves -εz_n on the weights."""
    loss_plus: list[float] = []
    loss_minus: list[float] = []
    for seed in seeds:
        # -- probe +ε: one pass (it also takes the previous probe's -ε off) ---------------------------------
        sync()
        probe.move(seed, eps)
        plus = float(loss_fn())  # host sync
        # -- probe -ε: one pass --------------------------------------------------------------------------------
        sync()
        probe.move(seed, -eps)
        minus = float(loss_fn())  # host sync
        if not (math.isfinite(plus) and math.isfinite(minus)):
            raise NonFiniteLossError(f"non-finite loss at probe seed {seed}: L+={plus}, L-={minus}")
        loss_plus.append(plus)
        loss_minus.append(minus)
    return loss_plus, loss_minus


def _probe_one_sided(probe: _Probe, loss_fn: LossFn, seeds: tuple[int, ...], eps: float,
                     sync: Callable[[], None]) -> tuple[list[float], float]:
    """FZOO's probes: L(θ) with no pass, then +εz_k for each k, one pass each (it also takes z_{k-1} off);
    leaves +εz_n on the weights."""
    base = float(loss_fn())  # host sync; the weights are at the committed step
    if not math.isfinite(base):
        raise NonFiniteLossError(f"non-finite loss at the committed weights: L0={base}")
    losses: list[float] = []
    for seed in seeds:
        sync()
        probe.move(seed, eps)
        loss = float(loss_fn())  # host sync
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss at probe seed {seed}: L+={loss}")
        losses.append(loss)
    return losses, base


def apply_update(
    params: TrainableSet,
    seeds: Sequence[int],
    update: Sequence[float],
    *,
    decay: float,
    kind: ZKind,
    take_off: float = 0.0,
) -> None:
    """θ ← (θ + take_off·z_n)·decay + Σ_k update_k·z_k in one pass: a step's update, fused with taking its last
    probe off (``take_off`` = minus the probe's scale: +ε after SPSA's -εz_n, -ε after FZOO's +εz_n)."""
    n = len(seeds)
    params.apply(seeds, [0.0] * (n - 1) + [take_off], list(update), decay=decay, kind=kind)


def commit_update(
    params: TrainableSet,
    seeds: Sequence[int],
    projected_grads: Sequence[float],
    *,
    lr: float,
    weight_decay: float,
    kind: ZKind,
    take_off: float = 0.0,
) -> None:
    """θ ← (θ + take_off·z_n)·(1 - lr·wd) - lr·Σ_k (g_k/n)·z_k in one pass: the update of a step, fused with taking
    its last probe (-ε·z_n, so ``take_off = ε``) off the weights. ``take_off = 0`` applies the update alone."""
    apply_update(params, seeds, sgd_update(projected_grads, lr), decay=1.0 - lr * weight_decay, kind=kind,
                  take_off=take_off)


def replay_step(
    params: TrainableSet,
    seeds: Sequence[int],
    *,
    update: Sequence[float],
    eps: float,
    lr: float,
    weight_decay: float,
    kind: ZKind,
    estimator: Estimator = Estimator.SPSA,
    exact: bool = True,
    probes_off: bool = False,
) -> None:
    """Re-apply a recorded step, its update coefficients as they were applied, without scoring anything.

    ``exact`` repeats the step's perturbation passes too (2n + 1 passes for SPSA, n + 1 for FZOO), so every ±ε
    rounding happens as it did in training: a replay on the same kind of device is then bit-identical to the run.
    Without it, only the update is applied (1 pass), which differs from the run by the fp32 round-trip error of
    its probes (~1 ulp per step). ``probes_off``: the step took its last probe off before its commit (a sharded
    step, see :func:`mezo_step`'s ``reduce``), one pass more.
    """
    decay = 1.0 - lr * weight_decay
    if not exact:
        apply_update(params, seeds, update, decay=decay, kind=kind)
        return
    probe = _Probe(params, kind)
    for seed, scale in Estimator(estimator).probe_states(seeds, eps):
        probe.move(seed, scale)
    if probes_off:
        probe.take_off()
    apply_update(params, seeds, update, decay=decay, kind=kind, take_off=-probe.scale)


def replay_aborted(params: TrainableSet, aborted: AbortedProbes, *, kind: ZKind) -> None:
    """Repeat an aborted step's probe passes and the pass that took them off (see :class:`AbortedProbes`)."""
    states = Estimator(aborted.estimator).probe_states(aborted.seeds, aborted.eps)
    if not 0 < aborted.passes <= len(states):
        raise ValueError(f"an aborted {aborted.estimator.value} step of {len(aborted.seeds)} probe(s) cannot have "
                         f"made {aborted.passes} passes")
    probe = _Probe(params, kind)
    for seed, scale in states[: aborted.passes]:
        probe.move(seed, scale)
    probe.take_off()
