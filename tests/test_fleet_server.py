"""Two servers in a fleet (--mezo-fleet-*), on loopback: the leader trains alone; a server that joins late replays
the leader's history before it serves (the same weights, byte for byte); from the next job on both servers'
replicas share every step's batch and exchange only losses, so both end every job with the same weights, equal to
a one-process replay of the leader's history; both answer /generate alike; a fault on the member stops the step on
both. The member refuses what would change the weights (409 naming the leader) and sends questions about jobs to
the leader; a message not signed with the fleet's secret is refused."""

from __future__ import annotations

import time

import pytest

from mezo_checks import engine_for_served, run_job
from servers import PAPER_STEP, running_server
from sglang_mezo.core.params import weights_digest
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.server  # starts two real SGLang servers

TRAIN = [{"prompt": "the movie was", "completion": " great"}, {"prompt": "the film was", "completion": " terrible"},
         {"prompt": "a plot that", "completion": " works"}]
JOB = {"examples": TRAIN, "lr": 3e-3, "eps": 1e-3, "batch_size": 3, "n_probes": 2}


def fleet_args(secret, rank: int, leader: str = "127.0.0.1:{port}") -> tuple[str, ...]:
    return ("--mezo-fleet-address", leader, "--mezo-fleet-size", "2", "--mezo-fleet-rank", str(rank),
            "--mezo-fleet-secret-file", str(secret))


def fingerprints(server) -> list[dict]:
    status, body = server.request("GET", "/mezo/weights?fingerprint=1")
    assert status == 200, body
    return body["fingerprints"]


def assert_every_server_is_the_replay(leader, model_path: str, servers: int = 2) -> None:
    prints = fingerprints(leader)
    assert sorted(p["server"] for p in prints) == list(range(servers)), prints
    replay = weights_digest(engine_for_served(leader, model_path).trainable_pieces())
    assert {p["digest"] for p in prints} == {replay}, (prints, replay)


def wait_for_member(leader, version: str | None = None, timeout_s: float = 120) -> dict:
    """The fleet once a member has joined (and, with ``version``, serves weights of that label)."""
    deadline = time.monotonic() + timeout_s
    while True:
        fleet = leader.request("GET", "/mezo/fleet")[1]
        if fleet["members"] and version in (None, fleet["members"][0]["weight_version"]):
            return fleet
        assert time.monotonic() < deadline, fleet
        time.sleep(0.5)


def greedy(server) -> str:
    status, out = server.request("POST", "/generate", {"text": "the movie was", "sampling_params": {
        "max_new_tokens": 6, "temperature": 0}})
    assert status == 200, out
    return out["text"]


def test_two_servers_train_one_model_and_a_late_joiner_catches_up(tmp_path):
    model_path = save_tiny_llama(tmp_path / "model", seed=7)
    secret = tmp_path / "secret"
    secret.write_text("a fleet's shared secret, 32 bytes")
    with running_server(model_path, *PAPER_STEP, "--mezo-z-kind", "gaussian", *fleet_args(secret, 0),
                        log_dir=tmp_path) as leader:
        alone = run_job(leader, {**JOB, "steps": 10})  # before anyone joined: the leader's replica alone
        assert alone["status"] == "succeeded", alone
        assert leader.request("GET", "/mezo/fleet")[1]["members"] == []
        address = leader.url.removeprefix("http://")
        # on the member only (the fleet's process 1): a scorer failure at step 12 of the job with seed 1
        with running_server(model_path, *PAPER_STEP, "--mezo-z-kind", "gaussian",
                            *fleet_args(secret, 1, address), log_dir=tmp_path,
                            env={"SGLANG_CPU_OMP_THREADS_BIND": "1", "SGLANG_MEZO_INJECT_FAULT": "raise@1/12:3#1"}
                            ) as member:
            # it replayed the leader's history before serving: the same weights, byte for byte
            fleet = wait_for_member(leader)
            assert fleet["members"][0]["weight_version"] == fleet["weight_version"], fleet
            assert_every_server_is_the_replay(leader, model_path)
            # the leader's weights move while the member is outside the group: it sees the label differ and replays
            status, body = leader.request("POST", "/mezo/reset", {"job_id": alone["job_id"], "step": 5})
            assert status == 200 and body["weight_version"] == f"mezo-{alone['job_id']}-5", body
            wait_for_member(leader, version=body["weight_version"])
            assert_every_server_is_the_replay(leader, model_path)

            for route, body in (("/mezo/step", {**JOB, "steps": 1}), ("/mezo/reset", {})):
                status, answer = member.request("POST", route, body)
                assert status == 409 and answer["leader"] == leader.url, answer
            status, jobs = member.request("GET", "/mezo/jobs")  # the leader's jobs (a redirect, followed)
            assert status == 200 and [j["job_id"] for j in jobs["jobs"]] == [alone["job_id"]], jobs
            status, body = member.request("POST", "/mezo/fleet/relay", {"not": "signed"})
            assert status == 400 and "signed" in body["message"], body

            base = fingerprints(leader)
            job = run_job(leader, {**JOB, "steps": 50})
            assert job["status"] == "succeeded" and job["step"] == 50, job
            trajectory = leader.request("GET", f"/mezo/jobs/{job['job_id']}/trajectory")[1]
            assert trajectory["config"]["shards"] == 2, trajectory["config"]
            sent = [(p["exchanged_bytes"] - b["exchanged_bytes"]) / 50 for p, b in zip(fingerprints(leader), base)]
            assert all(8 * 28 + 40 <= s < 1024 for s in sent), sent  # scalars only: under the 1 KB a step
            assert_every_server_is_the_replay(leader, model_path)
            assert greedy(leader) == greedy(member)
            served = leader.request("GET", "/mezo/weights")[1]["weight_version"]
            assert served == f"mezo-{job['job_id']}-50"
            assert member.request("GET", "/mezo/weights")[1]["weight_version"] == served  # the leader's label

            failed = run_job(leader, {**JOB, "steps": 20, "seed": 1})
            assert failed["status"] == "failed" and failed["step"] == 12, failed
            assert "injected" in failed["error"], failed  # the member that failed says why
            assert_every_server_is_the_replay(leader, model_path)
