"""Data parallel on CPU: with --dp-size 2 each replica scores its shard of every step's batch and the replicas
exchange only their losses, so both end every job with the same weights, byte for byte (their fingerprints), equal
to a one-process replay of the job's trajectory onto the plain checkpoint; both answer /generate alike; a fault on
one replica stops the step on both, and the weights of both are those of the kept history."""

from __future__ import annotations

import pytest

from mezo_checks import engine_for_served, run_job
from servers import PAPER_STEP, running_server
from sglang_mezo.core.params import weights_digest
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.server  # starts a real SGLang server with two replicas

TRAIN = [{"prompt": "the movie was", "completion": " great"}, {"prompt": "the film was", "completion": " terrible"},
         {"prompt": "a plot that", "completion": " works"}]


def fingerprints(server) -> list[dict]:
    status, body = server.request("GET", "/mezo/weights?fingerprint=1")
    assert status == 200, body
    return body["fingerprints"]


def assert_replicas_are_the_replay(server, model_path: str) -> None:
    prints = fingerprints(server)
    assert [p["dp_rank"] for p in prints] == [0, 1], prints
    replay = weights_digest(engine_for_served(server, model_path).trainable_pieces())
    assert {p["digest"] for p in prints} == {replay}, (prints, replay)


def generations(server, n: int = 4) -> dict[int, set[str]]:
    """Greedy answers by the replica that gave them (SGLang sends requests to the replicas in turn)."""
    by_rank: dict[int, set[str]] = {}
    for _ in range(n):
        status, out = server.request("POST", "/generate", {"text": "the movie was", "sampling_params": {
            "max_new_tokens": 6, "temperature": 0}})
        assert status == 200, out
        by_rank.setdefault(out["meta_info"].get("dp_rank", -1), set()).add(out["text"])
    return by_rank


def test_dp2_replicas_train_one_model_by_exchanging_losses(tmp_path):
    model_path = save_tiny_llama(tmp_path / "model", seed=7)
    # on replica 1 only: a scorer failure at step 12 of the job with seed 1 (its third loss call)
    with running_server(model_path, *PAPER_STEP, "--dp-size", "2", "--mezo-z-kind", "gaussian", log_dir=tmp_path,
                        env={"SGLANG_MEZO_INJECT_FAULT": "raise@1/12:3#1"}) as server:
        base = fingerprints(server)
        assert base[0]["digest"] == base[1]["digest"]
        status, body = server.request("GET", "/mezo/weights?fingerprints=1")  # misspelt: said, not ignored
        assert status == 400 and "fingerprint=1" in body["message"], body
        assert "fingerprints" not in server.request("GET", "/mezo/weights")[1] or \
            server.request("GET", "/mezo/weights")[1]["fingerprints"] is None  # computed only when asked
        job = run_job(server, {"examples": TRAIN, "steps": 50, "lr": 3e-3, "eps": 1e-3, "batch_size": 3,
                               "n_probes": 2})
        assert job["status"] == "succeeded" and job["step"] == 50, job
        # scalars only: per step and replica, 8 agreements of 28 B and one all-gather of 5 float64, plus a few
        # agreements per chunk; far under the 1 KB
        sent = [(p["exchanged_bytes"] - b["exchanged_bytes"]) / 50 for p, b in zip(fingerprints(server), base)]
        assert all(8 * 28 + 40 <= s < 1024 for s in sent), sent
        trajectory = server.request("GET", f"/mezo/jobs/{job['job_id']}/trajectory")[1]
        assert trajectory["config"]["shards"] == 2 and trajectory["format_version"] == 4
        assert fingerprints(server)[0]["digest"] != base[0]["digest"]
        assert_replicas_are_the_replay(server, model_path)
        answers = generations(server)
        assert set(answers) == {0, 1}, answers  # both replicas answered ...
        assert len(set().union(*answers.values())) == 1, answers  # ... the same text

        failed = run_job(server, {"examples": TRAIN, "steps": 20, "lr": 3e-3, "eps": 1e-3, "batch_size": 3,
                                  "n_probes": 2, "seed": 1})
        assert failed["status"] == "failed" and failed["step"] == 12, failed
        assert "injected" in failed["error"], failed  # the replica that failed says why
        assert_replicas_are_the_replay(server, model_path)
        assert run_job(server, {"examples": TRAIN, "steps": 3, "lr": 3e-3, "batch_size": 1, "seed": 3})[
            "status"] == "succeeded"  # a batch smaller than the replicas: one scores nothing each step
        assert_replicas_are_the_replay(server, model_path)

