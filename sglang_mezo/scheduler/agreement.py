"""Agreement between tensor-parallel ranks: one all-reduce that keeps every rank in the same step.

Every rank runs the same handler on the same message, and the forward passes inside a step are collectives. A
rank that failed must not leave the others waiting inside a forward's all-reduce, so ranks agree before every
weight pass and every forward (a rank that failed answers "no" there) and at each step's end, where they also
compare how many probe passes they made and whether each committed: any difference means their shards no longer
belong to one model. With one rank every agreement is local and free.
"""

from __future__ import annotations

from typing import NamedTuple


class OtherRankFailed(RuntimeError):
    """Another tensor-parallel rank failed; this rank stops the step with it."""


class Verdict(NamedTuple):
    ok: bool
    """Every rank is fine."""
    in_step: bool
    """Every rank was still inside the step (at a pass's or a forward's agreement), not at its end."""
    consistent: bool
    """No rank's weights are at an unknown state, and at a step's end all made the same passes and commits."""


class TPAgreement:
    def __init__(self, tp_size: int) -> None:
        self.tp_size = tp_size

    def agree(self, ok: bool, *, in_step: bool, consistent: bool, passes: int = 0,
              committed: bool = False) -> Verdict:
        """One all-reduce (MIN) over the TP ranks' flags; see :class:`Verdict`."""
        local = Verdict(ok, in_step, consistent)
        if self.tp_size == 1:
            return local
        import torch
        import torch.distributed as dist
        from sglang.srt.distributed import get_tp_group

        flags = torch.tensor([int(ok), int(in_step), int(consistent), passes, -passes, int(committed),
                              -int(committed)], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=get_tp_group().cpu_group)
        all_ok, all_in_step, all_consistent, min_passes, neg_max_passes, min_commit, neg_max_commit = flags.tolist()
        if not all_in_step:  # a step's end: the ranks' passes and commits are comparable
            all_consistent = all_consistent and min_passes == -neg_max_passes and min_commit == -neg_max_commit
        return Verdict(bool(all_ok), bool(all_in_step), bool(all_consistent))
