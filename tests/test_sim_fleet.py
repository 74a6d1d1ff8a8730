"""benchmarks/sim_fleet.py: the fleet simulation's arithmetic, on cases whose answer is known without it."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sim_fleet import HEADER, TCP_IP, Fleet, simulate  # noqa: E402

QUIET = Fleet(64, sigma=0.0, straggler_p=0.0, fail_p=0.0, lost_p=0.0, commit_loss_p=0.0)


@pytest.mark.parametrize("policy", ["all", "deadline"])
def test_a_quiet_fleet_steps_at_one_shard_time_plus_the_tree_s_hops_and_uses_the_whole_batch(policy):
    fleet = replace(QUIET, policy=policy)
    stats = simulate(fleet, 50)
    row = stats.row(fleet)
    assert fleet.depth == 2  # 64 replicas under a fan-in of 8
    assert row["median_step_over_shard"] == pytest.approx(1 + 4 * fleet.hop_s)
    assert row["median_share_used"] == 1.0 and stats.aborted == stats.resyncs == stats.stale_replica_steps == 0
    # n = 8: up 24 + 9 float64, down 8 + 1 + 8 + 8 float64, one segment's headers each way
    assert row["payload_bytes_per_replica"] == HEADER + 72 + 81 == 177
    assert row["wire_bytes_per_replica"] == 177 + 2 * TCP_IP


def test_the_deadline_caps_a_step_and_commits_without_the_stragglers_while_waiting_for_all_does_not():
    slow = replace(QUIET, straggler_p=0.05, straggler_x=3.0)
    waiting = simulate(replace(slow, policy="all"), 200).row(replace(slow, policy="all"))
    capped = simulate(slow, 200).row(slow)
    assert waiting["median_step_over_shard"] == pytest.approx(3 + 4 * slow.hop_s)  # P(a straggler of 64) = 96 %
    assert capped["p99_step_over_shard"] == pytest.approx(slow.deadline_x + 4 * slow.hop_s)
    assert 0.9 < capped["median_share_used"] < 1.0 and waiting["median_share_used"] == 1.0


def test_a_lost_commit_leaves_a_replica_a_step_behind_until_the_next_step_re_syncs_it():
    lossy = replace(QUIET, commit_loss_p=0.05)
    stats = simulate(lossy, 100)
    # every stale replica re-syncs at the next step's start (those left stale by the last step have no next one)
    assert 0 < stats.resyncs <= stats.stale_replica_steps <= stats.resyncs + 64
    lost = simulate(replace(QUIET, lost_p=1e-3), 100)
    assert 0 < lost.lost < 20 and lost.steps == 100 and lost.aborted == 0  # the batch re-split, the job goes on
