"""A fine-tune survives a crash (--mezo-state-dir), on a real SGLang server on CPU: the server is killed with SIGKILL
mid-job at several points, started again on the same folder and base checkpoint, and then serves exactly the
weights of the journal's committed steps (bit for bit, against the reference engine's replay), under the label
they had, with the interrupted job listed as failed and its committed steps kept."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from mezo_checks import assert_served_is_replay, run_job
from servers import PAPER_STEP, running_server
from tiny_models import save_tiny_llama


pytestmark = pytest.mark.server  # starts real SGLang servers

TRAIN = [{"prompt": "the movie was", "completion": " great"}, {"prompt": "the film was", "completion": " bad"},
         {"prompt": "a great story with", "completion": " great music"}]
JOB = {"examples": TRAIN, "lr": 3e-3, "eps": 1e-3, "batch_size": 2, "n_probes": 2}


def kill_during(server, job_id: str, after_steps: int) -> int:
    """SIGKILL the whole server (every process) once the job has committed ``after_steps`` steps; the last step
    count the server reported before it died."""
    deadline = time.monotonic() + 120
    while (seen := server.request("GET", f"/mezo/jobs/{job_id}")[1]["step"]) < after_steps:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()
    return seen


def test_a_server_killed_mid_job_comes_back_with_the_weights_it_had_committed(tmp_path):
    model_path = save_tiny_llama(tmp_path / "model", seed=9)
    state = [*PAPER_STEP, "--mezo-state-dir", str(tmp_path / "state"), "--mezo-z-kind", "gaussian", "--mezo-chunk-ms",
             "0"]
    rng = random.Random(2026)
    with running_server(model_path, *state, log_dir=tmp_path) as server:
        done = run_job(server, {**JOB, "steps": 4, "seed": 1})
        assert done["status"] == "succeeded"
        job = server.request("POST", "/mezo/step", {**JOB, "steps": 400, "seed": 2})[1]
        seen = kill_during(server, job["job_id"], rng.randrange(2, 12))
    interrupted = [job["job_id"]]
    for trial in range(3):  # three kill points; each restart picks up the last one's journal
        with running_server(model_path, *state, log_dir=tmp_path) as server:
            jobs = {j["job_id"]: j for j in server.request("GET", "/mezo/jobs")[1]["jobs"]}
            assert jobs[done["job_id"]]["status"] == "succeeded" and jobs[done["job_id"]]["step"] == 4
            for job_id in interrupted:
                assert jobs[job_id]["status"] == "failed" and jobs[job_id]["error_kind"] == "interrupted", jobs[job_id]
            last = jobs[interrupted[-1]]
            assert last["step"] >= seen  # what a client saw before the crash was already on disk
            weights = server.request("GET", "/mezo/weights")[1]
            assert weights["weight_version"] == f"mezo-{last['job_id']}-{last['step']}", (weights, last)
            assert weights["history"][-1] == {"job_id": last["job_id"], "steps": last["step"],
                                              "records": last["step"]}
            # the label SGLang itself serves with, and the weights, exactly
            assert server.request("GET", "/model_info")[1]["weight_version"] == weights["weight_version"]
            assert_served_is_replay(server, model_path)
            if trial < 2:
                job = server.request("POST", "/mezo/step", {**JOB, "steps": 400, "seed": 3 + trial})[1]
                seen = kill_during(server, job["job_id"], rng.randrange(1, 12))
                interrupted.append(job["job_id"])
