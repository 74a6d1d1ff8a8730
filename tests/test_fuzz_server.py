"""Generated requests (tests/fuzz.py) against a real SGLang server on CPU, seeded and bounded: invalid ones get a 4xx
with a message and leave the served scores bit-identical; valid ones a 2xx or a 4xx, and afterwards the served
weights are exactly the replay of the served history. Never a 5xx, never a hang."""

from __future__ import annotations

import time
import urllib.request

import pytest
from fuzz import fuzz
from mezo_checks import assert_served_is_replay, served_logprobs
from schemathesis import GenerationMode
from servers import PAPER_STEP, running_server
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.server  # starts a real SGLang server

LIMITS = ["--mezo-max-steps-per-job", "40", "--mezo-max-examples-per-job", "8", "--mezo-max-tokens-per-job", "600",
          "--mezo-max-probes", "2", "--mezo-max-queued-jobs", "2", "--mezo-max-event-streams", "1",
          "--mezo-max-body-mb", "1"]
TRAIN = [{"prompt": "the movie was", "completion": " great"}, {"prompt": "the film was", "completion": " bad"}]


def test_generated_requests_against_a_real_server(tmp_path):
    model_path = save_tiny_llama(tmp_path / "model", seed=13)
    (tmp_path / "data").mkdir()
    with running_server(model_path, *PAPER_STEP, *LIMITS, "--mezo-data-dir", str(tmp_path / "data"), "--mezo-output-dir",
                        str(tmp_path / "out"), log_dir=tmp_path) as server:
        before = served_logprobs(server)
        invalid = fuzz(server.url, GenerationMode.NEGATIVE, examples=5)
        assert all(400 <= s < 500 for statuses in invalid.values() for s in statuses), invalid
        assert server.request("GET", "/mezo/jobs")[1]["jobs"] == []
        assert served_logprobs(server) == before

        fuzz(server.url, GenerationMode.POSITIVE, examples=4)
        deadline = time.monotonic() + 300
        while any(j["status"] in ("queued", "running") for j in server.request("GET", "/mezo/jobs")[1]["jobs"]):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert_served_is_replay(server, model_path)

        # each limit, by name, and nothing changes
        jobs = len(server.request("GET", "/mezo/jobs")[1]["jobs"])
        for body, flag in [({"examples": TRAIN, "steps": 41}, "--mezo-max-steps-per-job"),
                           ({"examples": TRAIN * 5}, "--mezo-max-examples-per-job"),
                           ({"examples": [{"prompt": "the movie " * 10, "completion": " great"}] * 8},
                            "--mezo-max-tokens-per-job"),  # each under the context, together over the limit
                           ({"examples": TRAIN, "n_probes": 3}, "--mezo-max-probes")]:
            status, out = server.request("POST", "/mezo/step", body)
            assert status == 400 and flag in out["message"], (flag, out)
        status, out = server.request("POST", "/mezo/step", {"examples": TRAIN, "pad": "x" * (2 << 20)})
        assert status == 413 and "--mezo-max-body-mb" in out["message"], out
        # two jobs queued or running: a third is a 429, and so is a second event stream
        running = [server.request("POST", "/mezo/step", {"examples": TRAIN, "steps": 40, "lr": 0.0})[1]
                   for _ in range(2)]
        status, out = server.request("POST", "/mezo/step", {"examples": TRAIN})
        assert status == 429 and "--mezo-max-queued-jobs" in out["message"], out
        with urllib.request.urlopen(f"{server.url}/mezo/jobs/{running[-1]['job_id']}/events", timeout=120) as one:
            one.readline()
            status, out = server.request("GET", f"/mezo/jobs/{running[-1]['job_id']}/events")
            assert status == 429 and "--mezo-max-event-streams" in out["message"], out
            one.read()  # to the job's end
        assert len(server.request("GET", "/mezo/jobs")[1]["jobs"]) == jobs + 2
        assert_served_is_replay(server, model_path)
