"""A step's batch shared between data-parallel replicas: who scores which example, and how their losses combine.

Each replica scores only its shard under every probe and sends (examples, per-probe mean losses); every replica
combines the same rows into the same totals, so every replica computes the same update coefficients and applies
the same pass: their weights stay equal bit for bit without any weight ever travelling. The rule for the shards is
fixed and recorded (the config's ``shards``), so a step can be audited against its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

_T = TypeVar("_T")


def shard_of(batch: Sequence[_T], step: int, rank: int, shards: int) -> tuple[_T, ...]:
    """Replica ``rank``'s examples of step ``step``: example i goes to replica (i + step) mod ``shards``. The shift
    by the step spreads a batch's remainder (and a batch smaller than the replicas) over all of them in turn."""
    if not 0 <= rank < shards:
        raise ValueError(f"replica {rank} of {shards}")
    return tuple(e for i, e in enumerate(batch) if (i + step) % shards == rank)


def combine(rows: Sequence[Sequence[float]]) -> list[float]:
    """The batch's mean of each value from one row per replica, ``[examples, mean_1, …, mean_m]``: Σ_r n_r·mean_r /
    Σ_r n_r, each sum exactly rounded (``math.fsum``), so the totals do not depend on the rows' order and every
    replica that holds the same rows gets the same floats. A row with 0 examples adds nothing."""
    if not rows:
        raise ValueError("no replica's losses to combine")
    width = len(rows[0])
    if width < 1 or any(len(r) != width for r in rows):
        raise ValueError(f"rows of unequal width: {[len(r) for r in rows]}")
    total = math.fsum(r[0] for r in rows)
    if total <= 0:
        raise ValueError("no replica scored an example")
    return [math.fsum(r[0] * r[j] for r in rows if r[0]) / total for j in range(1, width)]
