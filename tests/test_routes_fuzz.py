"""The /mezo routes under generated requests (tests/fuzz.py), over real HTTP to the routes on uvicorn with the fake
executor: invalid requests leave the served weights bit-identical and queue nothing; valid ones may train, and
then the served weights are exactly the replay of the served history."""

from __future__ import annotations

import time

import pytest
import torch
from fakes import mezo_app, replayed, served
from fuzz import fuzz
from schemathesis import GenerationMode

from sglang_mezo.options import Limits

LIMITS = Limits(max_steps_per_job=4, max_examples_per_job=8, max_tokens_per_job=400, max_probes=2,
                max_queued_jobs=4)


@pytest.mark.slow
def test_generated_requests_get_a_2xx_or_a_4xx_with_a_message(tmp_path):
    app, executor = mezo_app(tmp_path, limits=LIMITS)
    runner = app.state.mezo.runner
    before = executor.weights()
    with served(app) as url:
        invalid = fuzz(url, GenerationMode.NEGATIVE, examples=12)
        assert all(400 <= s < 500 for statuses in invalid.values() for s in statuses), invalid
        assert sum(map(len, invalid.values())) > 50
        assert runner.jobs == {} and all(torch.equal(t, before[k]) for k, t in executor.weights().items())

        # bodies the schema allows (most still fail a validator the schema cannot say: a 400 with its reason)
        valid = fuzz(url, GenerationMode.POSITIVE, examples=8)
        successes = {op for op, statuses in valid.items() if any(200 <= s < 300 for s in statuses)}
        assert {"POST /mezo/reset", "POST /mezo/save", "GET /mezo/weights"} <= successes, valid
    while not all(j.status.finished for j in runner.jobs.values()):
        time.sleep(0.05)  # (a job a request started may still run: the served history is whole once it ends)
    weights = executor.weights()
    expected = replayed(executor, [s.trajectory for s in runner.weights.segments])
    assert all(torch.equal(t, weights[k]) for k, t in expected.items())
