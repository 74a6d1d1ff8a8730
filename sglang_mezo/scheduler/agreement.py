"""Agreement between a server's scheduler processes: one all-reduce that keeps every rank in the same step.

Every rank (each tensor-parallel rank of each data-parallel replica) runs the same handler on the same message,
and the forward passes inside a step are collectives (TP's all-reduces, the replicas' loss exchange). A rank that
failed must not leave the others waiting inside a collective, so ranks agree before every weight pass and every
forward (a rank that failed answers "no" there) and at each step's end, where they also compare how many probe
passes they made and whether each committed: any difference means their weights no longer belong to one model.
With one rank every agreement is local and free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class OtherRankFailed(RuntimeError):
    """Another rank (of this replica's TP group, or another replica) failed; this rank stops the step with it."""


class Verdict(NamedTuple):
    ok: bool
    """Every rank is fine."""
    in_step: bool
    """Every rank was still inside the step (at a pass's or a forward's agreement), not at its end."""
    consistent: bool
    """No rank's weights are at an unknown state, and at a step's end all made the same passes and commits."""


class Agreement:
    """``size`` ranks whose flags (int32) ``reduce_min`` all-reduces (MIN, in place) over the group; None for one
    rank."""

    def __init__(self, size: int, reduce_min: Callable[[torch.Tensor], None] | None) -> None:
        self.size = size
        self.reduce_min = reduce_min

    def agree(self, ok: bool, *, in_step: bool, consistent: bool, passes: int = 0,
              committed: bool = False) -> Verdict:
        """One all-reduce (MIN) over the ranks' flags; see :class:`Verdict`."""
        local = Verdict(ok, in_step, consistent)
        if self.size == 1 or self.reduce_min is None:
            return local
        # int32: 28 bytes per agreement (a step's passes are at most 2·64 + 3)
        flags = torch.tensor([int(ok), int(in_step), int(consistent), passes, -passes, int(committed),
                              -int(committed)], dtype=torch.int32)
        self.reduce_min(flags)
        all_ok, all_in_step, all_consistent, min_passes, neg_max_passes, min_commit, neg_max_commit = flags.tolist()
        if not all_in_step:  # a step's end: the ranks' passes and commits are comparable
            all_consistent = all_consistent and min_passes == -neg_max_passes and min_commit == -neg_max_commit
        return Verdict(bool(all_ok), bool(all_in_step), bool(all_consistent))
