"""MeZO inside a real SGLang server on CPU, over HTTP: the served weights train, user traffic only ever sees
committed weights, the result replays onto the plain checkpoint, and bad input gets clear errors."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from servers import running_server
from tiny_models import save_tiny_llama
from transformers import AutoModelForCausalLM

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.params import TrainableSet
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.engines.hf import HFEngine

TRAIN = [
    {"prompt": "the movie was", "completion": " great"},
    {"prompt": "the film was", "completion": " terrible"},
    {"prompt": "a great story with", "completion": " great music"},
    {"prompt": "a terrible script,", "completion": " boring scenes"},
]
# fixed token sequences scored through /generate: (prompt ids, completion ids)
PROBE = [([80, 82, 89, 76, 72], [224, 90, 68, 86]), ([87, 75, 72], [224, 80, 82, 89]), ([68, 224], [74, 85, 72])]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=3)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    with running_server(model_path, "--mezo-z-kind", "gaussian", log_dir=tmp_path_factory.mktemp("logs")) as srv:
        yield srv


def served_logprobs(server, probe=PROBE) -> list[list[float]]:
    """Completion-token log-probs as served by /generate (one prefill batch)."""
    status, out = server.request("POST", "/generate", {
        "input_ids": [p + c for p, c in probe],
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
    })
    assert status == 200, out
    # entry t (t >= 1) is log p(token t | tokens < t); entry 0 is None
    return [[e[0] for e in o["meta_info"]["input_token_logprobs"][len(p):]] for o, (p, _) in zip(out, probe)]


def run_job(server, body: dict, timeout_s: float = 300) -> dict:
    status, job = server.request("POST", "/mezo/step", body)
    assert status == 200, job
    deadline = time.monotonic() + timeout_s
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
        job = server.request("GET", f"/mezo/jobs/{job['job_id']}")[1]
    return job


def replayed_engine(model_path: str, trajectory: dict, upto: int | None = None) -> HFEngine:
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))
    traj = Trajectory.from_dict(trajectory)
    selection = MezoConfig.from_dict(traj.config).selection
    traj.replay(TrainableSet.from_pieces(engine.trainable_pieces(), selection, engine.num_layers), upto=upto)
    return engine


def hf_logprobs(engine: HFEngine, probe=PROBE) -> list[list[float]]:
    out = []
    for prompt, completion in probe:
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        out.append([lp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(completion)])
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def mean_train_loss(server, model_path: str) -> float:
    """Mean completion NLL of the training examples as the server scores them, tokenized as the server does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    probe = [(tok(e["prompt"])["input_ids"], tok(e["completion"], add_special_tokens=False)["input_ids"])
             for e in TRAIN]
    return sum(-sum(lp) / len(lp) for lp in served_logprobs(server, probe)) / len(TRAIN)


def test_lr_zero_leaves_the_served_scores_unchanged(server):
    before = served_logprobs(server)
    weight = server.request("GET", "/get_weights_by_name",
                            {"name": "model.layers.1.mlp.down_proj.weight", "truncate_size": 10_000})[1]
    job = run_job(server, {"examples": TRAIN, "steps": 20, "lr": 0.0, "eps": 1e-2, "batch_size": 2})
    assert job["status"] == "succeeded" and job["step"] == 20, job
    assert job["last"]["projected_grads"][0] != 0.0  # the probes really moved the weights
    assert max_diff(served_logprobs(server), before) <= 1e-5
    after = server.request("GET", "/get_weights_by_name",
                           {"name": "model.layers.1.mlp.down_proj.weight", "truncate_size": 10_000})[1]
    a, b = torch.tensor(after), torch.tensor(weight)
    assert (a - b).abs().max().item() <= 1e-6 * b.abs().max().item()


def test_training_lowers_the_loss_and_replays_onto_the_checkpoint(server, model_path, tmp_path):
    initial = mean_train_loss(server, model_path)
    job = run_job(server, {"examples": TRAIN, "steps": 100, "lr": 3e-3, "eps": 1e-3, "batch_size": 4, "seed": 5})
    assert job["status"] == "succeeded" and job["step"] == 100, job
    final = mean_train_loss(server, model_path)
    assert final < initial - 0.1, (initial, final)

    status, trajectory = server.request("GET", f"/mezo/jobs/{job['job_id']}/trajectory")
    assert status == 200 and len(trajectory["steps"]["step"]) == 100
    # the job's trajectory replayed onto the base checkpoint by the reference engine, saved, and served fresh
    engine = replayed_engine(model_path, trajectory)
    replayed = tmp_path / "replayed"
    engine.model.save_pretrained(replayed)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(model_path) / name, replayed / name)
    trained = served_logprobs(server)
    assert max_diff(trained, hf_logprobs(engine)) <= 1e-4
    with running_server(str(replayed), enable_mezo=False, log_dir=tmp_path) as fresh:
        assert max_diff(trained, served_logprobs(fresh)) <= 1e-4


def test_concurrent_clients_only_see_committed_weights(server, model_path):
    """4 clients score a fixed batch while a job runs; every answer equals the scores of the weights after some
    committed step k (replayed exactly by the reference engine), never those of perturbed weights."""
    stop = threading.Event()
    answers: list[tuple[float, list[list[float]]]] = []
    errors: list[BaseException] = []

    def client() -> None:
        body = json.dumps({"input_ids": [p + c for p, c in PROBE], "sampling_params": {"max_new_tokens": 0},
                           "return_logprob": True, "logprob_start_len": 0}).encode()
        while not stop.is_set():
            started = time.monotonic()
            try:
                req = urllib.request.Request(server.url + "/generate", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    out = json.loads(resp.read())
                lps = [[e[0] for e in o["meta_info"]["input_token_logprobs"][len(p):]] for o, (p, _) in
                       zip(out, PROBE)]
                answers.append((time.monotonic() - started, lps))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        job = run_job(server, {"examples": TRAIN, "steps": 12, "lr": 3e-2, "eps": 3e-2, "batch_size": 2,
                               "seed": 11})
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert job["status"] == "succeeded", job
    assert len(answers) >= 8
    trajectory = server.request("GET", f"/mezo/jobs/{job['job_id']}/trajectory")[1]
    # weights before this job (earlier tests trained them): the trajectories of all jobs so far, in order
    jobs = server.request("GET", "/mezo/jobs")[1]["jobs"]
    history = [server.request("GET", f"/mezo/jobs/{j['job_id']}/trajectory")[1] for j in jobs
               if j["status"] == "succeeded" and j["job_id"] != job["job_id"] and j["step"] > 0]
    committed = []
    for k in range(len(trajectory["steps"]["step"]) + 1):
        engine = HFEngine(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))
        for earlier in history:
            traj = Trajectory.from_dict(earlier)
            traj.replay(TrainableSet.from_pieces(engine.trainable_pieces(), MezoConfig.from_dict(traj.config).selection,
                                                 engine.num_layers))
        traj = Trajectory.from_dict(trajectory)
        traj.replay(TrainableSet.from_pieces(engine.trainable_pieces()), upto=k)
        committed.append(hf_logprobs(engine))
    assert min(max_diff(committed[0], c) for c in committed[1:]) > 1e-3  # the steps are distinguishable
    for latency, lps in answers:
        assert min(max_diff(lps, c) for c in committed) <= 1e-4, "an answer matches no committed step"
