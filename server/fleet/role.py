"""This server's part in a fleet, as the routes see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .leader import FleetLeader


@dataclass
class FleetRole:
    rank: int
    size: int
    leader_url: str
    secret: bytes = field(repr=False)
    leader: FleetLeader | None = None
    """On the leader: its executor, which holds the members."""
    weight_version: str = ""
    """On a member: the label of the weights it serves (its last relayed chunk or restore set it)."""

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def follower_refusal(self, what: str) -> str:
        return (f"this server is rank {self.rank} of a fleet: {what} at the fleet's leader, {self.leader_url}, "
                "whose weights every server of the fleet serves")
