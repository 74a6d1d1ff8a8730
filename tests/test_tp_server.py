"""Tensor parallel on CPU: with --tp 2 every rank perturbs its own shards with the z of the *checkpoint* tensor
(split q/k/v and gate/up rows, split o/down columns, a padded vocabulary shard, a KV head replicated on both
ranks), so the job's trajectory replays onto the plain HF checkpoint and gives the served scores; one-token options
are scored as one sequence on both ranks. A failure on one
rank only stops the step on both (no rank is left waiting in a collective) and the weights are restored."""

from __future__ import annotations

import pytest

from mezo_checks import (assert_step_scores_per_option, engine_for_served, hf_logprobs, max_diff, run_job,
                         served_logprobs)
from servers import PAPER_STEP, running_server
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.server  # starts real SGLang servers

TRAIN = [{"prompt": "the movie was", "completion": " great"}, {"prompt": "the film was", "completion": " terrible"}]


def test_tp2_trajectory_replays_onto_the_checkpoint(tmp_path):
    # one KV head for two ranks: SGLang replicates it, and both copies must move identically
    model_path = save_tiny_llama(tmp_path / "model", seed=7, num_key_value_heads=1)
    # on TP rank 1 only: a scorer failure in step 32 of the job with seed 1, a torn pass in step 34 of seed 2's
    with running_server(model_path, *PAPER_STEP, "--tp", "2", "--mezo-z-kind", "gaussian", log_dir=tmp_path,
                        env={"SGLANG_MEZO_INJECT_FAULT": "raise@1/32:3#1,torn@2/34:2#1"}) as server:
        before = served_logprobs(server)
        # a sane lr: at 3e-2 the tiny model blows up (log-probs ~ -900), and 1e-4 absolute stops meaning anything
        job = run_job(server, {"examples": TRAIN, "steps": 30, "lr": 3e-3, "eps": 1e-3, "batch_size": 2})
        assert job["status"] == "succeeded" and job["step"] == 30, job
        trained = served_logprobs(server)
        assert max_diff(trained, before) > 1e-3
        assert max_diff(trained, hf_logprobs(engine_for_served(server, model_path))) <= 1e-4

        # failures on rank 1 alone: both ranks stop the step, and the weights are those of the kept history
        body = {"examples": TRAIN, "lr": 3e-3, "eps": 1e-3, "batch_size": 2, "seed": 1, "n_probes": 2}
        failed = run_job(server, {**body, "steps": 40})
        assert failed["status"] == "failed" and failed["step"] == 32, failed
        assert "another tensor-parallel rank" in failed["error"], failed
        torn = run_job(server, {**body, "steps": 40, "seed": 2})
        assert torn["status"] == "failed" and torn["step"] == 34, torn
        assert "restored to the last committed step" in torn["error"] and not torn["weights_inconsistent"], torn
        assert max_diff(served_logprobs(server), hf_logprobs(engine_for_served(server, model_path))) <= 1e-4
        assert run_job(server, {**body, "steps": 2, "seed": 3})["status"] == "succeeded"

        # one-token options share their prompt on both ranks: the option log-probs come from the gathered logits
        choices = [{"prompt": f"{e['prompt']}? ", "options": ["n", "y"], "label": i % 2} for i, e in enumerate(TRAIN)]
        assert_step_scores_per_option(server, model_path, choices, eps=1e-2, n_probes=2, seed=4)
