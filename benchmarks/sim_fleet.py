"""How a fleet of replicas would share a MeZO step by exchanging scalars: step time, bytes and safety from 1 to 1,000
replicas, simulated with no model (issue 27, ``docs/fleet.md``).

A step of n probes is fixed by its seed and the coefficients computed from the loss sums. Replica r scores its shard
of the batch under the step's probes and sends its per-forward loss sums up a fixed reduction tree (fan-in ``fanout``,
children summed in rank order in float64, so the total is the same bits wherever it is computed); the leader computes
the coefficients and sends them down with ``commit`` (or ``abort``); every replica applies them, or takes its probes
off and applies nothing. What is simulated, per step: each replica's shard time (a stated distribution), replicas that
fail mid-step, replicas lost for good, commit messages lost on the way down; the leader's rule for stragglers (wait for
every shard, or commit at a deadline with the shards in by then when they hold enough of the batch); hops of the tree.

What it reports: step time against one replica's median shard time, the share of the batch a step used, aborted
steps, bytes per step per replica (payload and on the wire), and an invariant checked at every step: no replica ever
holds a step the leader did not commit; a replica that missed a commit serves the previous version, whole, until the
next step's start names the version and it replays the journal (counted: stale replica-steps and re-syncs).

Run: ``python benchmarks/sim_fleet.py`` (a few seconds, one core); ``make sim-fleet`` runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

FLOAT = 8  # bytes of a float64: the loss sums and coefficients travel as float64
HEADER = 24  # job id hash (8), step (8), rank (4), examples scored (4)
TIMEOUT_X = 3.0  # in median shard times: how long the leader waits for a replica that may be gone
TCP_IP = 66  # Ethernet 14 + IPv4 20 + TCP 32 (timestamps): one segment per message, ACKs and gloo's framing aside


@dataclass(frozen=True)
class Fleet:
    """The fleet and the stated distributions the simulation draws from."""

    replicas: int
    n_probes: int = 8
    """FZOO's probes: each replica sends n + 1 loss sums (the unperturbed forward and n probes)."""
    batch_per_replica: int = 16
    shard_s: float = 1.0
    """A replica's median time to score its shard under every probe (the unit the step time is given in)."""
    sigma: float = 0.1
    """Shard times are lognormal around shard_s with this sigma (load, thermal and co-tenant noise)."""
    straggler_p: float = 0.01
    straggler_x: float = 3.0
    """With probability straggler_p a shard takes straggler_x times as long (a GC pause, a noisy neighbour)."""
    fail_p: float = 1e-4
    """Per replica per step: the replica drops out of this step (its sums never arrive) and is back for the next."""
    lost_p: float = 1e-5
    """Per replica per step, the leader aside: the replica is lost for good (removed at the deadline; its shard goes
    to the others)."""
    commit_loss_p: float = 1e-4
    """Per replica per step: the commit (or abort) message does not reach it."""
    hop_s: float = 0.002
    """One message over one hop of the tree (a LAN: ~2 ms; a WAN would be 20-100 ms)."""
    fanout: int = 8
    policy: str = "deadline"
    """``all``: wait for every live shard; ``deadline``: commit at ``deadline_x`` × shard_s with the shards in."""
    deadline_x: float = 1.18
    """The deadline in median shard times: with the reduce's hops, a step under 1.2 shard times (issue 27's target)."""
    min_share: float = 0.75
    """The least share of the batch's examples a committed step holds; below it the step aborts and is retried."""

    @property
    def depth(self) -> int:
        """Hops from the farthest replica to the leader in a tree of fan-in ``fanout``."""
        depth, reach = 0, 1
        while reach < self.replicas:
            reach *= self.fanout
            depth += 1
        return depth

    def up_bytes(self) -> int:
        return HEADER + FLOAT * (self.n_probes + 1)

    def down_bytes(self) -> int:
        """step (8), decision (1), lr (8) and the n coefficients the update applies (what the trajectory records)."""
        return 8 + 1 + FLOAT + FLOAT * self.n_probes


@dataclass
class Stats:
    replicas: int
    policy: str
    steps: int = 0
    attempts: int = 0
    aborted: int = 0
    resyncs: int = 0
    lost: int = 0
    stale_replica_steps: int = 0
    """Replica-steps served at the previous version (a commit message lost) before the replica re-synced."""
    step_times: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)

    def row(self, fleet: Fleet) -> dict:
        times = sorted(self.step_times)
        inner = min(fleet.fanout, max(0, fleet.replicas - 1))  # children of the busiest inner node
        leaf = fleet.up_bytes() + fleet.down_bytes()
        busiest = (inner + 1) * leaf if fleet.replicas > 1 else 0
        return {"replicas": self.replicas, "policy": self.policy, "steps": self.steps,
                "median_step_over_shard": statistics.median(times) / fleet.shard_s,
                "p99_step_over_shard": times[min(len(times) - 1, int(0.99 * len(times)))] / fleet.shard_s,
                "median_share_used": statistics.median(self.shares), "aborted_per_1000": 1000 * self.aborted
                / max(1, self.attempts), "resyncs": self.resyncs, "lost_for_good": self.lost,
                "stale_replica_steps": self.stale_replica_steps,
                "payload_bytes_per_replica": leaf if fleet.replicas > 1 else 0,
                "wire_bytes_per_replica": leaf + 2 * TCP_IP if fleet.replicas > 1 else 0,
                "payload_bytes_busiest": busiest, "wire_bytes_busiest": busiest + 2 * (inner + 1) * TCP_IP
                if fleet.replicas > 1 else 0,
                "tree_depth": fleet.depth}


def shard_time(fleet: Fleet, rng: random.Random, examples: int) -> float:
    time = fleet.shard_s * examples / fleet.batch_per_replica * math.exp(rng.gauss(0.0, fleet.sigma))
    return time * (fleet.straggler_x if rng.random() < fleet.straggler_p else 1.0)


def simulate(fleet: Fleet, steps: int, seed: int = 0) -> Stats:
    """``steps`` committed steps of one job; the batch (replicas × batch_per_replica examples) is split over the live
    replicas by a fixed rule (equal shards in rank order), re-split when one is lost for good."""
    rng = random.Random(seed)
    stats = Stats(fleet.replicas, fleet.policy)
    live = list(range(fleet.replicas))
    batch = fleet.replicas * fleet.batch_per_replica
    version = {r: 0 for r in live}  # the commits each replica has applied
    leader_version = 0
    while stats.steps < steps:
        stats.attempts += 1
        for r in live:  # the step's start names its version: a replica behind replays the journal before scoring
            if version[r] != leader_version:
                version[r] = leader_version
                stats.resyncs += 1
        shard = batch / len(live)
        arrivals: dict[int, float] = {}
        lost: list[int] = []
        for r in live:
            draw = rng.random()
            if draw < fleet.lost_p and r != 0:  # the leader lost is the job interrupted (resumed from its journal)
                lost.append(r)
            elif draw >= fleet.lost_p + fleet.fail_p:
                arrivals[r] = shard_time(fleet, rng, round(shard))
        reduce_s = 2 * fleet.depth * fleet.hop_s  # sums up the tree, the decision back down
        timeout = TIMEOUT_X * fleet.shard_s  # a replica that never answers is known only here
        order = sorted(arrivals, key=arrivals.get)
        if fleet.policy == "all":
            used = order
            wait = arrivals[order[-1]] if len(used) == len(live) else timeout
        else:
            # at the deadline, commit with the shards in if they hold min_share of the batch; else wait for the
            # shard that brings them there (a small fleet's slow shard), up to the timeout
            enough = math.ceil(fleet.min_share * len(live) - 1e-9)
            deadline = fleet.deadline_x * fleet.shard_s
            in_time = [r for r in order if arrivals[r] <= deadline]
            used = in_time if len(in_time) >= enough else order[:enough]
            if len(used) < enough:  # too many replicas never answer: abort at the timeout
                wait = timeout
            elif len(used) == len(live) or len(in_time) < enough:  # every shard in, or waiting past the deadline
                wait = min(arrivals[used[-1]], timeout)
            else:
                wait = deadline
        share = len(used) * shard / batch
        stats.lost += len(lost)
        live = [r for r in live if r not in lost]  # removed at the deadline; the next step re-splits the batch
        if share < fleet.min_share - 1e-12:
            stats.aborted += 1  # every replica takes its probes off and applies nothing; the step is retried
            continue
        stats.step_times.append(wait + reduce_s)
        stats.shares.append(share)
        leader_version += 1
        stats.steps += 1
        for r in live:  # the commit goes down the tree; a replica that does not get it stays at its old version
            if rng.random() >= fleet.commit_loss_p:
                version[r] = leader_version
        behind = sum(1 for r in live if version[r] < leader_version)
        stats.stale_replica_steps += behind  # serving the previous version (whole, never half) until it re-syncs
        assert all(version[r] <= leader_version for r in live)  # no replica holds a step the leader did not commit
    return stats


SIZES = (1, 2, 8, 64, 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="committed steps per setting")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("sim-fleet.json"))
    args = parser.parse_args()
    rows = []
    for replicas in SIZES:
        for policy in ("all", "deadline"):
            fleet = Fleet(replicas, policy=policy)
            rows.append(simulate(fleet, args.steps if replicas < 1000 else args.steps // 4, seed=replicas).row(fleet))
    args.out.write_text(json.dumps({"fleet": asdict(Fleet(0)), "rows": rows}, indent=1))
    print("| replicas | policy | median step / shard | p99 step / shard | batch used (median) | aborted per 1,000 "
          "| re-syncs | stale replica-steps | bytes per replica per step (payload / wire) | busiest node (payload / wire) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['replicas']:,} | {r['policy']} | {r['median_step_over_shard']:.3f} | {r['p99_step_over_shard']:.3f}"
              f" | {r['median_share_used']:.1%} | {r['aborted_per_1000']:.1f} | {r['resyncs']} | {r['stale_replica_steps']}"
              f" | {r['payload_bytes_per_replica']} / {r['wire_bytes_per_replica']}"
              f" | {r['payload_bytes_busiest']} / {r['wire_bytes_busiest']} |")


if __name__ == "__main__":
    main()
