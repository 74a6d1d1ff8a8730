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
import torch
from mezo_checks import base_engine, run_job, served_weights
from servers import running_server
from tiny_models import save_tiny_llama

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.params import TrainableSet
from sglang_mezo.core.trajectory import Trajectory

pytestmark = pytest.mark.server  # starts real SGLang servers

TRAIN = [{"prompt": "the movie was", "completion": " great"}, {"prompt": "the film was", "completion": " bad"},
         {"prompt": "a great story with", "completion": " great music"}]
JOB = {"examples": TRAIN, "lr": 3e-3, "eps": 1e-3, "batch_size": 2, "n_probes": 2}


def expected_weights(server, model_path: str) -> dict[str, torch.Tensor]:
    """The base checkpoint with the served history replayed by the reference engine, in SGLang's fused layout."""
    engine = base_engine(model_path)
    for segment in server.request("GET", "/mezo/weights")[1]["history"]:
        trajectory = Trajectory.from_dict(server.request("GET", f"/mezo/jobs/{segment['job_id']}/trajectory")[1])
        trajectory.records = trajectory.records[: segment["records"]]
        trajectory.replay(TrainableSet.from_pieces(engine.trainable_pieces(),
                                                   MezoConfig.from_dict(trajectory.config).selection))
    hf = engine.model.state_dict()
    out = {"model.embed_tokens.weight": hf["model.embed_tokens.weight"], "model.norm.weight": hf["model.norm.weight"]}
    for i in range(2):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.qkv_proj.weight"] = torch.cat([hf[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"])
        out[f"{p}.mlp.gate_up_proj.weight"] = torch.cat([hf[f"{p}.mlp.{x}_proj.weight"] for x in ("gate", "up")])
        for leaf in ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            out[f"{p}.{leaf}.weight"] = hf[f"{p}.{leaf}.weight"]
    return out


def kill_during(server, job_id: str, after_steps: int) -> None:
    """SIGKILL the whole server (every process) once the job has committed ``after_steps`` steps."""
    deadline = time.monotonic() + 120
    while server.request("GET", f"/mezo/jobs/{job_id}")[1]["step"] < after_steps:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()


def test_a_server_killed_mid_job_comes_back_with_the_weights_it_had_committed(tmp_path):
    model_path = save_tiny_llama(tmp_path / "model", seed=9)
    state = ["--mezo-state-dir", str(tmp_path / "state"), "--mezo-z-kind", "gaussian", "--mezo-chunk-ms", "0"]
    rng = random.Random(2026)
    with running_server(model_path, *state, log_dir=tmp_path) as server:
        done = run_job(server, {**JOB, "steps": 4, "seed": 1})
        assert done["status"] == "succeeded"
        job = server.request("POST", "/mezo/step", {**JOB, "steps": 400, "seed": 2})[1]
        kill_during(server, job["job_id"], rng.randrange(2, 12))
    interrupted = [job["job_id"]]
    for trial in range(3):  # three kill points; each restart picks up the last one's journal
        with running_server(model_path, *state, log_dir=tmp_path) as server:
            jobs = {j["job_id"]: j for j in server.request("GET", "/mezo/jobs")[1]["jobs"]}
            assert jobs[done["job_id"]]["status"] == "succeeded" and jobs[done["job_id"]]["step"] == 4
            for job_id in interrupted:
                assert jobs[job_id]["status"] == "failed" and jobs[job_id]["error_kind"] == "interrupted", jobs[job_id]
            last = jobs[interrupted[-1]]
            weights = server.request("GET", "/mezo/weights")[1]
            assert weights["weight_version"] == f"mezo-{last['job_id']}-{last['step']}", (weights, last)
            assert weights["history"][-1] == {"job_id": last["job_id"], "steps": last["step"],
                                              "records": last["step"]}
            # the label SGLang itself serves with, and the weights, exactly
            assert server.request("GET", "/model_info")[1]["weight_version"] == weights["weight_version"]
            served, expected = served_weights(server), expected_weights(server, model_path)
            for name, tensor in expected.items():  # (SGLang pads the vocabulary: its extra rows are no weights)
                assert torch.equal(served[name][: tensor.shape[0]], tensor), (trial, name)
            if trial < 2:
                job = server.request("POST", "/mezo/step", {**JOB, "steps": 400, "seed": 3 + trial})[1]
                kill_during(server, job["job_id"], rng.randrange(1, 12))
                interrupted.append(job["job_id"])
