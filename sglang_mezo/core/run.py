"""A MeZO run: config + trainable set + trajectory, stepping with seeds derived from the run's seed.

This is the whole optimiser state. There is no other: no moments, no stored z, no RNG object. Step k's seeds are
``derive_seed(config.seed, k, probe)``: they depend on the config alone, never on earlier steps.
"""

from __future__ import annotations

from sglang_mezo.kernels import derive_seed

from .config import MezoConfig
from .params import TrainableSet
from .spsa import LossFn, StepResult, mezo_step
from .trajectory import Trajectory


class MezoRun:
    def __init__(self, params: TrainableSet, config: MezoConfig, *, base_model: str = "") -> None:
        self.params = params
        self.config = config
        self.trajectory = Trajectory.for_params(
            params, config.z_kind, config=config.to_dict(), base_model=base_model
        )

    @property
    def next_step(self) -> int:
        """0-based index of the step :meth:`step` runs next (= number of committed steps)."""
        return self.trajectory.committed_steps

    def seeds_for(self, step: int) -> list[int]:
        return [derive_seed(self.config.seed, step, probe) for probe in range(self.config.n_probes)]

    def step(self, loss_fn: LossFn) -> StepResult:
        """One committed step (or an exception with the weights back at the last committed step); recorded in the
        trajectory either way (a failed step as its aborted probe passes)."""
        k = self.next_step
        cfg = self.config
        result = mezo_step(
            self.params,
            loss_fn,
            self.seeds_for(k),
            eps=cfg.eps,
            lr=cfg.lr_at(k),
            weight_decay=cfg.weight_decay,
            kind=cfg.z_kind,
            on_abort=lambda aborted: self.trajectory.append_aborted(k, aborted),
        )
        self.trajectory.append(k, result)
        return result
