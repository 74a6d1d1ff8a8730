"""The server's scheduler processes as one group: every data-parallel replica × every tensor-parallel rank.

SGLang gives each DP replica its own torch.distributed world (TP's groups live inside it) and no group spans the
replicas. A data-parallel MeZO step needs one: the replicas agree at every pass, exactly as TP ranks do
(:mod:`.agreement`), and exchange their shards' losses once per step (:mod:`sglang_mezo.core.shards`). This is a
gloo group of our own beside SGLang's, formed at launch at the loopback address the HTTP process chose (the
``ServerArgs._mezo`` options carry it to every scheduler): the traffic is a few scalars per pass, so the CPU
backend is the right one on any device. Process p = dp_rank × tp_size + tp_rank; rank 0 hosts the rendezvous.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

GROUP_NAME = "sglang-mezo-replicas"


@dataclass(frozen=True)
class Place:
    """Where one scheduler process sits in the server."""

    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int

    @property
    def rank(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank

    @property
    def size(self) -> int:
        return self.dp_size * self.tp_size


@dataclass
class Traffic:
    """What this process put into the group's collectives: the payload, before gloo's framing and TCP/IP."""

    collectives: int = 0
    payload_bytes: int = 0

    def add(self, nbytes: int) -> None:
        self.collectives += 1
        self.payload_bytes += nbytes


class ReplicaGroup:
    """The gloo group of every scheduler process of a server with ``--dp-size > 1`` (or of every server of a
    fleet), and its two collectives."""

    def __init__(self, place: Place, address: str, timeout_s: float, group_name: str = GROUP_NAME,
                 traffic: Traffic | None = None) -> None:
        from sglang.srt.utils.common import init_custom_process_group

        self.place = place
        self.traffic = traffic or Traffic()
        """Counted across this process's groups (a fleet's re-formed group goes on counting)."""
        started = datetime.datetime.now()
        self.group = init_custom_process_group(
            backend="gloo", init_method=f"tcp://{address}", world_size=place.size, rank=place.rank,
            group_name=group_name, timeout=datetime.timedelta(seconds=timeout_s))
        logger.info("MeZO: joined %s at %s as process %d of %d (replica %d, TP rank %d) in %.1f s",
                    group_name, address, place.rank, place.size, place.dp_rank, place.tp_rank,
                    (datetime.datetime.now() - started).total_seconds())

    def all_reduce_min(self, flags: torch.Tensor) -> None:
        """In place: the element-wise minimum over every process."""
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        self.traffic.add(flags.numel() * flags.element_size())

    def all_gather(self, values: list[float]) -> list[list[float]]:
        """Every process's ``values`` (the same length on all), in process order, as float64 exactly."""
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=torch.float64)
        rows = [torch.empty_like(mine) for _ in range(self.place.size)]
        dist.all_gather(rows, mine, group=self.group)
        self.traffic.add(mine.numel() * mine.element_size())
        return [row.tolist() for row in rows]

    def close(self) -> None:
        """Leave the group (a fleet re-forms its group when its members change)."""
        import torch.distributed as dist

        try:
            dist.destroy_process_group(self.group)
        except Exception:  # noqa: BLE001 - a group whose peers are gone may not close cleanly; it is dropped anyway
            logger.warning("MeZO: leaving a replicas' group failed", exc_info=True)
