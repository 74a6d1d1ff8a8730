"""A MeZO run: config + trainable set + trajectory, stepping with seeds derived from the run's seed.

This is the whole optimiser state. There is no other: no parameter-sized moments, no stored z, no RNG object;
with ``adaptive = scalar_rms``, two scalars (:class:`~.estimators.AdaptiveState`, carried by each step's result
into the next step). Step k's seeds are ``derive_seed(config.seed, k, probe)``: they depend on the config alone,
never on earlier steps. :func:`run_step` is the one place that turns (config, step index) into a step;
:class:`MezoRun` and the step handler inside SGLang's scheduler (:mod:`sglang_mezo.scheduler.handler`) both call it.
"""

from __future__ import annotations

from collections.abc import Callable

from sglang_mezo.kernels import derive_seed

from .config import MezoConfig
from .estimators import INITIAL_STATE, AdaptiveState
from .params import TrainableSet
from .spsa import AbortedProbes, LossFn, Reduce, StepResult, mezo_step
from .trajectory import Trajectory


def seeds_for(config: MezoConfig, step: int) -> list[int]:
    """The probe seeds of 0-based ``step`` of a run with ``config``."""
    return [derive_seed(config.seed, step, probe) for probe in range(config.n_probes)]


def run_step(
    params: TrainableSet,
    config: MezoConfig,
    step: int,
    loss_fn: LossFn,
    *,
    state: AdaptiveState = INITIAL_STATE,
    on_abort: Callable[[AbortedProbes], None] | None = None,
    before_pass: Callable[[], None] | None = None,
    reduce: Reduce | None = None,
) -> StepResult:
    """Step ``step`` of a run with ``config``: its seeds, its scheduled lr, the config's ε, weight decay, z kind,
    estimator and step-size rule. ``state`` is the rule's state after the previous committed step (the previous
    result's ``adaptive``; the initial state for step 0, and always for a run without a rule). See
    :func:`~sglang_mezo.core.spsa.mezo_step` for ``on_abort`` and ``before_pass``. Under per-tensor scales or a
    low-rank z (``config.tensor_scales``, ``config.z_rank``) the step moves ``params.variant(...)``: the same
    weights along other directions. A config with ``shards > 1`` always takes its probes off before the commit
    (its replay does), with ``reduce`` combining this shard's losses with the other replicas' (none given: this
    process holds the whole batch, as a test or a one-replica check of the passes)."""
    return mezo_step(
        params.variant(config.tensor_scales, config.z_rank),
        loss_fn,
        seeds_for(config, step),
        eps=config.eps,
        lr=config.lr_at(step),
        weight_decay=config.weight_decay,
        kind=config.z_kind,
        estimator=config.estimator,
        adaptive=config.adaptive_rule,
        state=state,
        on_abort=on_abort,
        before_pass=before_pass,
        reduce=reduce if reduce is not None or config.shards == 1 else _whole_batch,
    )


def _whole_batch(loss_plus, loss_minus):
    return loss_plus, loss_minus


class MezoRun:
    def __init__(self, params: TrainableSet, config: MezoConfig, *, base_model: str = "") -> None:
        self.params = params
        self.config = config
        self.trajectory = Trajectory.for_params(
            params, config.z_kind, config=config.to_dict(), base_model=base_model
        )
        self.state = INITIAL_STATE
        """The step-size rule's state after the committed steps."""

    @property
    def next_step(self) -> int:
        """0-based index of the step :meth:`step` runs next (= number of committed steps)."""
        return self.trajectory.committed_steps

    def seeds_for(self, step: int) -> list[int]:
        return seeds_for(self.config, step)

    def step(self, loss_fn: LossFn) -> StepResult:
        """One committed step (or an exception with the weights back at the last committed step); recorded in the
        trajectory either way (a failed step as its aborted probe passes)."""
        k = self.next_step
        result = run_step(self.params, self.config, k, loss_fn, state=self.state,
                          on_abort=lambda aborted: self.trajectory.append_aborted(k, aborted))
        self.trajectory.append(k, result)
        self.state = result.adaptive
        return result
