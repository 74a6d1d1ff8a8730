"""Generated requests (tests/fuzz.py) against a real SGLang server on CPU, seeded and bounded: invalid ones get a 4xx
with a message and leave the served scores bit-identical; valid ones a 2xx or a 4xx, and afterwards the served
weights are exactly the replay of the served history. Never a 5xx, never a hang."""

from __future__ import annotations

import time

import pytest
from fuzz import fuzz
from mezo_checks import assert_served_is_replay, served_logprobs
from schemathesis import GenerationMode
from servers import running_server
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.server  # starts a real SGLang server

LIMITS = ["--mezo-max-steps-per-job", "3", "--mezo-max-examples-per-job", "8", "--mezo-max-tokens-per-job", "600",
          "--mezo-max-probes", "2", "--mezo-max-queued-jobs", "4"]


def test_generated_requests_against_a_real_server(tmp_path):
    model_path = save_tiny_llama(tmp_path / "model", seed=13)
    (tmp_path / "data").mkdir()
    with running_server(model_path, *LIMITS, "--mezo-data-dir", str(tmp_path / "data"), "--mezo-output-dir",
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
