"""Fault injection for the failure tests (``SGLANG_MEZO_INJECT_FAULT``): a scorer that raises, a NaN loss, or a
weight pass that dies half-way, at a given step of a given job, on every rank or on one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.params import TrainableSet
from sglang_mezo.core.spsa import InconsistentWeightsError, LossFn
from sglang_mezo.kernels import zaxpy_

logger = logging.getLogger(__name__)

FAULT_ENV = "SGLANG_MEZO_INJECT_FAULT"
"""Testing only: comma-separated ``<kind>@[<seed>/]<step>:<call>[#<rank>]`` entries, each making step ``step``
fail once per server (of the first job with that seed, or of any job), just before its loss call ``call``
(1-based), that is after the weight pass that precedes that call, on every rank or only on the one given (a
process's rank in the server: replica × TP size + TP rank, so the TP rank with one replica and the replica with
one TP rank each).
``raise`` raises, ``nan`` returns NaN, ``torn`` moves part of the trainable tensors (as a weight pass that died
half-way would) and raises :class:`InconsistentWeightsError`. An adapter job's step makes one scoring call (every
probe at once): there ``raise`` and ``nan`` fail that call, and ``torn`` moves half of the adapter's fp32 master
(as a commit that died half-way would) and raises :class:`InconsistentWeightsError`."""

KINDS = ("raise", "nan", "torn")


class FaultInjector:
    def __init__(self, spec: str | None, rank: int) -> None:
        self.pending: dict[tuple[int | None, int], tuple[str, int]] = {}  # (seed, step) -> (kind, loss call)
        for entry in filter(None, (spec or "").split(",")):
            what, _, only = entry.strip().partition("#")
            kind, _, where = what.partition("@")
            seed, _, where = where.rpartition("/")
            step, _, call = where.partition(":")
            if kind not in KINDS:
                raise ValueError(f"{FAULT_ENV}: {entry!r}: the kind must be one of {', '.join(KINDS)}")
            if not only or int(only) == rank:
                self.pending[(int(seed) if seed else None, int(step))] = (kind, int(call))

    def _take(self, seed: int, step: int) -> tuple[str, int] | None:
        key = (seed, step) if (seed, step) in self.pending else (None, step)
        return self.pending.pop(key, None)

    def wrap_copies(self, losses: Callable[[Sequence[int]], list[float]], seed: int, step: int,
                    master: TrainableSet) -> Callable[[Sequence[int]], list[float]]:
        """An adapter step's scorer, or (once per server) one that fails as the spec says at this seed and step."""
        fault = self._take(seed, step)
        if fault is None:
            return losses
        kind, _ = fault

        def faulty(copies: Sequence[int]) -> list[float]:
            logger.warning("MeZO: injecting a %r fault at adapter step %d (%s)", kind, step, FAULT_ENV)
            return [_inject(kind, master, "a commit to the adapter's master")] * len(copies)

        return faulty

    def wrap(self, loss: LossFn, seed: int, step: int, params: TrainableSet) -> LossFn:
        """``loss``, or (once per server) a loss that fails as the spec says at this job seed and step."""
        fault = self._take(seed, step)
        if fault is None:
            return loss
        kind, fail_at = fault
        calls = 0

        def faulty() -> float:
            nonlocal calls
            calls += 1
            if calls != fail_at:
                return loss()
            logger.warning("MeZO: injecting a %r fault at step %d, loss call %d (%s)", kind, step, calls, FAULT_ENV)
            return _inject(kind, params, "a weight pass")

        return faulty


def _inject(kind: str, params: TrainableSet, torn_pass: str) -> float:
    """The fault itself: NaN for a loss; or half of ``params`` moved and the torn pass reported; or a scorer that
    raises."""
    if kind == "nan":
        return float("nan")
    if kind == "torn":
        half = params.targets[: max(1, len(params.targets) // 2)]
        zaxpy_(half, [12345], [1e-2], kind=MezoConfig().z_kind)
        raise InconsistentWeightsError(f"injected: {torn_pass} died half-way")
    raise RuntimeError("injected: the scorer failed")
