"""How a zeroth-order step turns its probe losses into an update: pure functions of scalars, no weights touched.

A step with probe seeds s_1..s_n measures losses, reduces them to one *direction coefficient* c_k per probe (the
step's direction is -Σ_k c_k z_k / n), and a step-size rule scales that into the *update coefficients* u_k that
the commit pass applies: θ ← θ·(1 - lr·wd) + Σ_k u_k z_k. :mod:`.spsa` moves the weights; this module only does
the arithmetic, so that the trajectory can record the u_k actually applied and replay never re-derives a float.

Estimators (:class:`Estimator`):

* ``spsa`` (MeZO): two-sided, L±_k = L(θ ± εz_k), g_k = (L+_k - L-_k)/(2ε), c_k = g_k. 2n forwards, 2n + 1
  passes over the weights.
* ``fzoo`` (FZOO, Dang et al., arXiv 2506.09034): one forward at θ (L0) and n one-sided probes L_k = L(θ + εz_k);
  g_k = (L_k - L0)/ε is recorded, and the direction is normalised by σ, the sample standard deviation of the n
  probe losses: c_k = (L_k - L0)/σ, i.e. θ ← θ - lr/(n·σ) Σ_k (L_k - L0) z_k. Since L_k - L0 ≈ ε⟨∇L, z_k⟩ and
  σ ≈ ε‖∇L‖ (Var⟨∇L, z⟩ = ‖∇L‖² for Rademacher and Gaussian z alike), the step is ≈ lr/n Σ_k ⟨∇L/‖∇L‖, z_k⟩ z_k:
  the zeroth-order normalised-SGD step the paper shows its update to be. Its size does not depend on ε or on the
  scale of the loss, and it is larger where the loss is flat. (Summaries of the paper write the update as
  θ - η·g/σ with g the one-sided estimate; if that g keeps its 1/ε, the paper's η is this lr times ε: the same
  rule.) n + 1 forwards, n + 1 passes. σ is the sample standard deviation (n - 1 denominator, torch.std's
  default), so fzoo needs n >= 2; when σ = 0 (every probe scored the same, as a piecewise-constant objective
  often does) the probes carry no usable direction and the step applies none. Caveat of the rule itself: the
  one-sided difference also holds ε²/2·z^T H z, nearly the same for every probe, which σ does not see; where
  the gradient is small next to ε times the curvature, the c_k are all large and of one sign.

* ``greedy`` (MeZO-Greedy, Jin et al., arXiv 2601.04710: "keeps the single best perturbation within a fixed
  evaluation budget"): SPSA's probes and g_k, and the step goes along the one probe whose |g_k| is largest, the
  direction of the pool best aligned with ∇L (ties: the first): c_k* = n·g_k*, the others 0, so that the step
  -Σ c_k z_k / n is that probe's own SPSA step, -g_k* z_k*. Its mean is still along -∇L (the pool's law is
  symmetric about ∇L), longer than SPSA's by E[max_k g_k²]/E[g²]. 2n forwards and passes like SPSA; n >= 2.
  The paper's other rule, MeZO-GV (a guiding vector from the elite probes, then an SPSA pair along it), probes
  along a combination that depends on the losses, which exact replay would have to record; not implemented.

Step-size rules (:class:`Adaptive`):

* ``none``: u_k = -lr·c_k/n (MeZO's SGD step).
* ``scalar_rms`` (after MEAZO, Dbouk et al., arXiv 2605.03869: "a single scalar second moment"):
  v_t = β·v_{t-1} + (1 - β)·(1/n)Σ_k c_k², v̂_t = v_t / (1 - β^t) and u_k = -lr/(√v̂_t + ζ)·c_k/n: Adam's
  normalisation by the root mean square of the gradient, with the moment one scalar per run instead of one per
  parameter. The state is (v_t, t), two scalars carried from step to step (:class:`AdaptiveState`), a pure
  function of earlier steps' measured losses. MEAZO averages the square of the step's *mean* projected gradient,
  ḡ_t²; for one probe that is the same thing, but with n > 1 probes whose c_k differ in sign ḡ_t is near 0 by
  chance, lr/√v̂ blows up (at t = 1, v̂ = ḡ_1² exactly) and the step, made of c_k ≫ ḡ_t, with it: on the tests'
  quadratic (n = 4) the mean step's cosine with -∇L fell from 0.95 to 0.23 for some seeds. The mean of squares
  bounds every step (|c_k|/√v̂_1 <= √n), and for SPSA it estimates ‖∇L‖², so the step is a normalised-SGD step
  like FZOO's.

AdaMeZO (arXiv 2605.00650) rebuilds per-parameter Adam moments from the last h steps' seeds and scalars; its
elementwise m/√v is no linear combination of z's, so it needs another kernel, regenerating h z's per element at
every commit. It is not implemented here.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


class Estimator(str, enum.Enum):
    SPSA = "spsa"
    FZOO = "fzoo"
    GREEDY = "greedy"

    @property
    def two_sided(self) -> bool:
        """Whether the step probes θ ± εz_k (SPSA's probes; greedy's too) rather than θ and θ + εz_k (FZOO)."""
        return self is not Estimator.FZOO

    def forwards(self, n_probes: int) -> int:
        """Forward passes (scorings of the batch) per step."""
        return 2 * n_probes if self.two_sided else n_probes + 1

    def probe_states(self, seeds: Sequence[int], eps: float) -> list[tuple[int, float]]:
        """The perturbations the weights go through, one pass each, before the commit pass: (seed, scale) for
        θ + scale·z(seed). Two-sided: +εz_1, -εz_1, +εz_2, …; FZOO (after scoring θ itself): +εz_1, +εz_2, …"""
        if self.two_sided:
            return [(seed, scale) for seed in seeds for scale in (eps, -eps)]
        return [(seed, eps) for seed in seeds]

    @property
    def min_probes(self) -> int:
        """SPSA works with one probe; FZOO needs two for a spread, greedy two to have a choice."""
        return 1 if self is Estimator.SPSA else 2

    def direction(self, loss_plus: Sequence[float], loss_minus: Sequence[float], eps: float) -> Direction:
        """The step's direction from its probe losses: L(θ + εz_k) and, per probe, the loss it is differenced
        against (L(θ - εz_k), or FZOO's L(θ) repeated)."""
        if self is Estimator.FZOO:
            return fzoo_direction(loss_plus, loss_minus[0], eps)
        if self is Estimator.GREEDY:
            return greedy_direction(loss_plus, loss_minus, eps)
        return spsa_direction(loss_plus, loss_minus, eps)


class Adaptive(str, enum.Enum):
    NONE = "none"
    SCALAR_RMS = "scalar_rms"


@dataclass(frozen=True)
class ScalarRMS:
    """The ``scalar_rms`` rule's constants: β, the decay of the second moment (0.99: a memory of about 100 steps,
    short enough for runs of a few hundred steps), and ζ, added to √v̂ so that a run whose first gradients are all
    zero does not divide by zero."""

    beta: float = 0.99
    floor: float = 1e-8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and 0.0 <= self.beta < 1.0):
            raise ValueError(f"the second moment's decay must be in [0, 1), got {self.beta}")
        if not (math.isfinite(self.floor) and self.floor > 0.0):
            raise ValueError(f"the second moment's floor must be a positive finite number, got {self.floor}")


@dataclass(frozen=True)
class AdaptiveState:
    """The step-size rule's state after a run's committed steps: the scalar second moment v and how many updates
    it has folded in (for the bias correction). The initial state is also the state of a run with no rule."""

    second_moment: float = 0.0
    updates: int = 0


INITIAL_STATE = AdaptiveState()
"""The state before a run's first step."""


@dataclass(frozen=True)
class Direction:
    """What an estimator made of a step's losses."""

    projected_grads: tuple[float, ...]
    """g_k, the finite-difference estimate of ⟨∇L, z_k⟩ (recorded and reported; SPSA's update is built on it)."""
    coefficients: tuple[float, ...]
    """c_k: the step direction is -Σ_k c_k z_k / n, before the step size."""


def spsa_direction(loss_plus: Sequence[float], loss_minus: Sequence[float], eps: float) -> Direction:
    grads = tuple((plus - minus) / (2 * eps) for plus, minus in zip(loss_plus, loss_minus, strict=True))
    return Direction(projected_grads=grads, coefficients=grads)


def greedy_direction(loss_plus: Sequence[float], loss_minus: Sequence[float], eps: float) -> Direction:
    """SPSA's g_k, and the whole step along the probe of largest |g_k| (the first of equals)."""
    grads = spsa_direction(loss_plus, loss_minus, eps).projected_grads
    best = max(range(len(grads)), key=lambda k: abs(grads[k]))
    n = len(grads)
    return Direction(projected_grads=grads, coefficients=tuple(n * g if k == best else 0.0
                                                               for k, g in enumerate(grads)))


def fzoo_direction(losses: Sequence[float], base: float, eps: float) -> Direction:
    """FZOO's one-sided differences against ``base`` = L(θ), normalised by the sample std of ``losses``."""
    if len(losses) < 2:
        raise ValueError("fzoo normalises by the spread of the probe losses: it needs at least 2 probes")
    grads = tuple((loss - base) / eps for loss in losses)
    sigma = statistics.stdev(losses)
    if not (sigma > 0.0 and math.isfinite(sigma)):
        return Direction(projected_grads=grads, coefficients=(0.0,) * len(losses))
    return Direction(projected_grads=grads, coefficients=tuple((loss - base) / sigma for loss in losses))


def update_coefficients(direction: Direction, *, lr: float, rule: ScalarRMS | None,
                        state: AdaptiveState) -> tuple[tuple[float, ...], AdaptiveState]:
    """The update coefficients u_k of a step (θ gains Σ_k u_k z_k) and the rule's state after it."""
    coefficients = direction.coefficients
    n = len(coefficients)
    if rule is None:
        # -lr * c / n exactly as MeZO's step has always computed it: the default stays bit-for-bit the same
        return tuple(-lr * c / n for c in coefficients), state
    mean_square = math.fsum(c * c for c in coefficients) / n
    second_moment = rule.beta * state.second_moment + (1.0 - rule.beta) * mean_square
    updates = state.updates + 1
    corrected = second_moment / (1.0 - rule.beta ** updates)
    lr_effective = lr / (math.sqrt(corrected) + rule.floor)
    return tuple(-lr_effective * c / n for c in coefficients), AdaptiveState(second_moment, updates)


def sgd_update(projected_grads: Sequence[float], lr: float) -> tuple[float, ...]:
    """MeZO's update coefficients -lr·g_k/n: what a record written before the coefficients were recorded applied."""
    n = len(projected_grads)
    return tuple(-lr * g / n for g in projected_grads)
