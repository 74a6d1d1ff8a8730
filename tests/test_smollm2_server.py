"""The same flow as test_mezo_server.py, on the real default model (SmolLM2-135M-Instruct, fp32, CPU): lr = 0
changes nothing, a job lowers the loss on its examples, and a fresh server loaded with the trajectory replayed
onto the checkpoint serves the same scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mezo_checks import engine_for_served, hf_logprobs, max_diff, run_job, served_logprobs
from servers import PAPER_STEP, running_server
from transformers import AutoTokenizer

pytestmark = pytest.mark.server  # starts real SGLang servers

EXAMPLES = [
    {"prompt": "The capital of France is", "completion": " Paris, a city of light"},
    {"prompt": "Two plus two equals", "completion": " four, as everyone knows"},
]


def mean_nll(logprobs: list[list[float]]) -> float:
    return sum(-sum(lp) / len(lp) for lp in logprobs) / len(logprobs)


@pytest.mark.slow
def test_smollm2_trains_in_the_server_and_replays(smollm2_path, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    probe = [(tok(e["prompt"])["input_ids"], tok(e["completion"], add_special_tokens=False)["input_ids"])
             for e in EXAMPLES]
    with running_server(smollm2_path, *PAPER_STEP, "--mezo-last-layers", "2", log_dir=tmp_path) as server:
        before = served_logprobs(server, probe)
        job = run_job(server, {"examples": EXAMPLES, "steps": 5, "lr": 0.0, "batch_size": 2})
        assert job["status"] == "succeeded" and job["last"]["projected_grads"][0] != 0.0, job
        # lr = 0 leaves only the fp32 rounding of the probes' round trips, which 30 layers turn into log-prob noise:
        # 1.14e-5 measured 2026-11-30 on the 2-core CPU machine (the same to the last digit with the code before
        # the typed-records restructure), above the 1e-5 this test first asserted on another machine
        assert max_diff(served_logprobs(server, probe), before) <= LR_ZERO_NOISE

        job = run_job(server, {"examples": EXAMPLES, "steps": 20, "lr": LR, "batch_size": 2, "seed": 1})
        assert job["status"] == "succeeded" and job["step"] == 20, job
        trained = served_logprobs(server, probe)
        assert mean_nll(trained) < mean_nll(before) - MARGIN, (mean_nll(before), mean_nll(trained))
        with torch.inference_mode():
            engine = engine_for_served(server, smollm2_path)
            assert max_diff(trained, hf_logprobs(engine, probe)) <= 1e-4
    replayed = tmp_path / "replayed"
    engine.model.save_pretrained(replayed)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (Path(smollm2_path) / name).exists():
            shutil.copy(Path(smollm2_path) / name, replayed / name)
    with running_server(str(replayed), enable_mezo=False, log_dir=tmp_path) as fresh:
        assert max_diff(trained, served_logprobs(fresh, probe)) <= 1e-4


# Measured 2026-11-25 (2 cores, seed 1, last 2 blocks, Rademacher z): mean NLL 3.067 -> 2.971 after 20 steps.
# One seed only: the multi-seed evidence that MeZO learns is test_convergence.py; this test is about the flow on
# the real model (in-server steps, replay, a fresh server on the replayed checkpoint).
LR = 1e-4
MARGIN = 0.03
LR_ZERO_NOISE = 5e-5
