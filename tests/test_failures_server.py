"""Failures inside a scheduler step, and resetting the served weights, on a real SGLang server on CPU over HTTP.

Faults are injected in the scheduler (``SGLANG_MEZO_INJECT_FAULT``), each for the job with a given seed: a scorer
that raises mid-step, and a weight pass that dies half-way ("torn": part of the tensors moved). Afterwards the served weights must be exactly those
the kept history describes, and training must go on.
"""

from __future__ import annotations

import time

import pytest
import torch
from mezo_checks import engine_for_served, hf_logprobs, max_diff, run_job, served_logprobs, served_weights
from servers import PAPER_STEP, running_server
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.server  # starts real SGLang servers

TRAIN = [
    {"prompt": "the movie was", "completion": " great"},
    {"prompt": "the film was", "completion": " terrible"},
    {"prompt": "a great story with", "completion": " great music"},
]
JOB = {"examples": TRAIN, "lr": 5e-3, "eps": 1e-3, "batch_size": 3, "n_probes": 2}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=5)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    # the job with seed 2: its 3rd loss call of step 4 raises; the job with seed 3: a weight pass of step 7 is torn
    with running_server(model_path, *PAPER_STEP, "--mezo-z-kind", "rademacher", log_dir=tmp_path_factory.mktemp("logs"),
                        env={"SGLANG_MEZO_INJECT_FAULT": "raise@2/4:3,torn@3/7:2"}) as srv:
        yield srv


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max().item():.3g}"


def reset(server, **body) -> dict:
    status, out = server.request("POST", "/mezo/reset", body)
    assert status == 200, out
    return out


def test_failures_leave_the_weights_exactly_at_the_kept_history(server, model_path):
    reset(server)  # the base, whatever ran before
    base_weights, base_scores = served_weights(server), served_logprobs(server)

    first = run_job(server, {**JOB, "steps": 3, "seed": 1})
    assert first["status"] == "succeeded", first
    after_first = served_weights(server)

    # a scorer failure mid-step: the job stops after its 4 committed steps; the probe passes of the failed step are
    # in the trajectory, so re-reading the base and replaying the history gives the same weights bit for bit
    failed = run_job(server, {**JOB, "steps": 6, "seed": 2})
    assert failed["status"] == "failed" and failed["step"] == 4 and "injected" in failed["error"], failed
    assert not failed["weights_inconsistent"]
    trajectory = server.request("GET", f"/mezo/jobs/{failed['job_id']}/trajectory")[1]
    assert trajectory["steps"]["aborted_passes"] == [0, 0, 0, 0, 3]
    after_failure = served_weights(server)
    reset(server, job_id=failed["job_id"])
    assert_same(served_weights(server), after_failure)

    # a torn weight pass: the runner restores the weights to the last committed step at once
    torn = run_job(server, {**JOB, "steps": 10, "seed": 3})
    assert torn["status"] == "failed" and torn["step"] == 7, torn
    assert "restored to the last committed step" in torn["error"] and not torn["weights_inconsistent"], torn
    weights = server.request("GET", "/mezo/weights")[1]
    assert [(s["job_id"], s["steps"]) for s in weights["history"]] == [
        (first["job_id"], 3), (failed["job_id"], 4), (torn["job_id"], 7)]  # on the base, as the reset left it
    # the half-moved tensors (a 1e-2 move) would show far above 1e-4
    assert max_diff(served_logprobs(server), hf_logprobs(engine_for_served(server, model_path))) <= 1e-4
    after_torn = served_weights(server)
    reset(server, job_id=torn["job_id"])
    assert_same(served_weights(server), after_torn)

    # training goes on
    assert run_job(server, {**JOB, "steps": 2, "seed": 4})["status"] == "succeeded"

    # resets: to the end of an earlier job, back "forward" to a step inside a job that reset dropped, to the base
    out = reset(server, job_id=first["job_id"])
    assert [s["job_id"] for s in out["history"]] == [first["job_id"]]
    assert_same(served_weights(server), after_first)
    out = reset(server, job_id=failed["job_id"], step=2)
    assert [(s["job_id"], s["steps"]) for s in out["history"]] == [(first["job_id"], 3), (failed["job_id"], 2)]
    assert max_diff(served_logprobs(server), hf_logprobs(engine_for_served(server, model_path))) <= 1e-4
    reset(server)
    assert_same(served_weights(server), base_weights)
    assert served_logprobs(server) == base_scores


def test_reset_errors(server):
    assert server.request("POST", "/mezo/reset", {"job_id": "nope"})[0] == 404
    assert server.request("POST", "/mezo/reset", {"step": 3})[0] == 400
    assert server.request("POST", "/mezo/reset", {"job_id": "x", "step": -1})[0] == 400
    job = run_job(server, {**JOB, "steps": 1, "seed": 9})
    status, out = server.request("POST", "/mezo/reset", {"job_id": job["job_id"], "step": 5})
    assert status == 400 and "1 committed steps" in out["message"], out
    status, queued = server.request("POST", "/mezo/step", {**JOB, "steps": 50, "seed": 10})
    assert status == 200
    try:
        status, out = server.request("POST", "/mezo/reset", {})
        assert status == 409 and "queued or running" in out["message"], out
    finally:
        server.request("POST", f"/mezo/jobs/{queued['job_id']}/cancel")
        while server.request("GET", f"/mezo/jobs/{queued['job_id']}")[1]["status"] in ("queued", "running"):
            time.sleep(0.05)  # a cancel takes effect at the next chunk boundary
