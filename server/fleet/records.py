"""What a fleet's servers say to each other besides the schedulers' own messages (those travel as they are)."""

from __future__ import annotations

from dataclasses import dataclass

from sglang_mezo.core.trajectory import Trajectory


@dataclass(frozen=True)
class Join:
    """A server's request to take part (sent to the leader once it serves, and again whenever it restarts)."""

    rank: int
    url: str
    """Where the leader reaches it (``http://host:port``)."""
    replicas: int
    """Its ``--dp-size``."""
    tp_size: int
    weight_version: str
    """The label of the weights it serves now."""
    instance: str = ""
    """Made at its launch: a server that restarted at the same address is a new member (its schedulers are in no
    group)."""


@dataclass(frozen=True)
class Joined:
    """The leader's answer: what it serves now (a joiner behind it is re-synced before its first job)."""

    weight_version: str


@dataclass(frozen=True)
class History:
    """The leader's served history: the base checkpoint plus these trajectories, replayed in order, are its weights,
    labelled ``weight_version`` (``base_weight_version`` for the base itself)."""

    trajectories: tuple[Trajectory, ...]
    weight_version: str
    base_weight_version: str
    base_model: str
    """The leader's checkpoint's folder name: a joiner serving another model is refused."""


@dataclass(frozen=True)
class MemberState:
    """One server of the fleet as the leader sees it (``GET /mezo/fleet``)."""

    rank: int
    url: str
    replicas: int
    weight_version: str
    in_group: bool
    """Whether its replicas share the steps of the jobs that start now."""
