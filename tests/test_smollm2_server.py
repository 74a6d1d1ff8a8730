"""The same flow as test_mezo_server.py, on the real default model (SmolLM2-135M-Instruct, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from mezo_checks import engine_after_jobs, hf_logprobs, max_diff, run_job, served_logprobs
from servers import running_server
from transformers import AutoTokenizer

EXAMPLES = [
    {"prompt": "The capital of France is", "completion": " Paris"},
    {"prompt": "Two plus two equals", "completion": " four"},
]


@pytest.mark.slow
def test_smollm2_trains_in_the_server_and_replays(smollm2_path, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    probe = [(tok(e["prompt"])["input_ids"], tok(e["completion"], add_special_tokens=False)["input_ids"])
             for e in EXAMPLES]
    with running_server(smollm2_path, "--mezo-last-layers", "2", log_dir=tmp_path) as server:
        before = served_logprobs(server, probe)
        job = run_job(server, {"examples": EXAMPLES, "steps": 5, "lr": 0.0, "batch_size": 2})
        assert job["status"] == "succeeded" and job["last"]["projected_grads"][0] != 0.0, job
        assert max_diff(served_logprobs(server, probe), before) <= 1e-5

        job = run_job(server, {"examples": EXAMPLES, "steps": 10, "lr": 1e-4, "batch_size": 2, "seed": 1})
        assert job["status"] == "succeeded" and job["step"] == 10, job
        trained = served_logprobs(server, probe)
        assert max_diff(trained, before) > 1e-4  # the served weights did change
        with torch.inference_mode():
            replayed = hf_logprobs(engine_after_jobs(server, smollm2_path), probe)
        assert max_diff(trained, replayed) <= 1e-4
