"""MeZO inside a real SGLang server on CPU, over HTTP: the served weights train, user traffic only ever sees
committed weights, the result replays onto the plain checkpoint, and bad input gets clear errors."""

from __future__ import annotations

import functools
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from mezo_checks import (PROBE, TRAIN, engine_for_served, hf_logprobs, max_diff, run_job, served_logprobs,
                         served_weights)
from servers import PAPER_STEP, running_server
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.server  # starts real SGLang servers


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=3)


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("out")


@pytest.fixture(scope="module")
def server(model_path, output_dir, tmp_path_factory):
    # one step per chunk: a user request then waits at most one step (asserted below)
    with running_server(model_path, *PAPER_STEP, "--mezo-z-kind", "gaussian", "--mezo-chunk-ms", "0", "--mezo-output-dir",
                        str(output_dir), log_dir=tmp_path_factory.mktemp("logs")) as srv:
        yield srv


def mean_train_loss(server, model_path: str) -> float:
    """Mean completion NLL of the training examples as the server scores them, tokenized as the server does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    probe = [(tok(e["prompt"])["input_ids"], tok(e["completion"], add_special_tokens=False)["input_ids"])
             for e in TRAIN]
    return sum(-sum(lp) / len(lp) for lp in served_logprobs(server, probe)) / len(TRAIN)


def test_lr_zero_leaves_the_served_scores_unchanged(server):
    before = served_logprobs(server)
    weights = served_weights(server)
    job = run_job(server, {"examples": TRAIN, "steps": 20, "lr": 0.0, "eps": 1e-2, "batch_size": 2})
    assert job["status"] == "succeeded" and job["step"] == 20, job
    assert job["last"]["projected_grads"][0] != 0.0  # the probes really moved the weights
    assert max_diff(served_logprobs(server), before) <= 1e-5
    for name, after in served_weights(server).items():
        b = weights[name]
        assert after.shape == b.shape and after.numel() > 0, name
        assert (after - b).abs().max().item() <= 1e-6 * b.abs().max().item(), name


CACHEABLE = ([72, 224, 80, 82, 89, 76] * 6, [87, 75, 72])


def cacheable_logprobs(server) -> tuple[list[float], int]:
    """Completion log-probs of CACHEABLE, asked so that SGLang may reuse cached KV of its prompt (a prefix match
    is capped at logprob_start_len), and how many prompt tokens came from the cache."""
    prompt, completion = CACHEABLE
    status, out = server.request("POST", "/generate", {
        "input_ids": prompt + completion, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": len(prompt) - 1,
    })
    assert status == 200, out
    entries = out["meta_info"]["input_token_logprobs"]
    return [e[0] for e in entries[1:]], out["meta_info"]["cached_tokens"]


def test_training_lowers_the_loss_and_replays_onto_the_checkpoint(server, model_path, tmp_path):
    cacheable_logprobs(server)
    assert cacheable_logprobs(server)[1] > 0  # the prompt's KV is in the prefix cache now
    initial = mean_train_loss(server, model_path)
    job = run_job(server, {"examples": TRAIN, "steps": 100, "lr": 3e-3, "eps": 1e-3, "batch_size": 4, "seed": 5})
    assert job["status"] == "succeeded" and job["step"] == 100, job
    final = mean_train_loss(server, model_path)
    assert final < initial - 0.1, (initial, final)

    status, trajectory = server.request("GET", f"/mezo/jobs/{job['job_id']}/trajectory")
    assert status == 200 and len(trajectory["steps"]["step"]) == 100
    # the trajectories replayed onto the base checkpoint by the reference engine, saved, and served fresh
    engine = engine_for_served(server, model_path)
    replayed = tmp_path / "replayed"
    engine.model.save_pretrained(replayed)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(model_path) / name, replayed / name)
    trained = served_logprobs(server)
    assert max_diff(trained, hf_logprobs(engine)) <= 1e-4
    # the cached prefix was computed with the old weights: it must not be served after the update
    after_update, _ = cacheable_logprobs(server)
    assert max_diff([after_update], hf_logprobs(engine, [CACHEABLE])) <= 1e-4
    with running_server(str(replayed), enable_mezo=False, log_dir=tmp_path) as fresh:
        assert max_diff(trained, served_logprobs(fresh)) <= 1e-4


def test_save_writes_a_checkpoint_that_transformers_and_a_fresh_server_load(server, model_path, output_dir, tmp_path):
    job = run_job(server, {"examples": TRAIN, "steps": 5, "lr": 1e-2, "batch_size": 2, "seed": 31})
    assert job["status"] == "succeeded", job
    target = output_dir / "saved"
    status, saved = server.request("POST", "/mezo/save", {"path": "saved"})
    assert status == 200, saved
    assert saved["weight_version"] == server.request("GET", "/mezo/weights")[1]["weight_version"]
    assert "model.layers.1.self_attn.q_proj.weight" in saved["tensors"]
    # the saved tensors are bit for bit the base checkpoint with the served history replayed
    expected = engine_for_served(server, model_path).model.state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).state_dict()
    assert expected.keys() == loaded.keys()
    for name in expected:
        assert torch.equal(expected[name], loaded[name]), name
    provenance = json.loads((target / "mezo_history.json").read_text())
    assert provenance["weight_version"] == saved["weight_version"] and provenance["history"]
    with running_server(str(target), enable_mezo=False, log_dir=tmp_path) as fresh:
        assert served_logprobs(fresh) == served_logprobs(server)
    # refused: a relative path, a folder that is not empty, the base checkpoint
    # refused: a path that is not a name in the output folder, one outside it, one that exists (without overwrite)
    assert server.request("POST", "/mezo/save", {"path": str(target)})[0] == 400
    assert server.request("POST", "/mezo/save", {"path": "../escape", "overwrite": True})[0] == 403
    assert server.request("POST", "/mezo/save", {"path": "saved"})[0] == 409
    (output_dir / "to-base").symlink_to(model_path)  # never the base checkpoint, whatever the name leads to
    assert server.request("POST", "/mezo/save", {"path": "to-base", "overwrite": True})[0] == 403


def run_job_under_load(server, body: dict, clients: list, stop: threading.Event) -> dict:
    """Run a job to its end while each client loops in its own thread (until ``stop`` is set, here at the end)."""
    threads = [threading.Thread(target=client) for client in clients]
    for t in threads:
        t.start()
    try:
        return run_job(server, body)
    finally:
        stop.set()
        for t in threads:
            t.join()


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

    baseline = []
    for _ in range(5):
        started = time.monotonic()
        served_logprobs(server)
        baseline.append(time.monotonic() - started)
    job = run_job_under_load(server, {"examples": TRAIN, "steps": 12, "lr": 3e-2, "eps": 3e-2, "batch_size": 2,
                                      "seed": 11}, [client] * 4, stop)
    assert not errors, errors
    assert job["status"] == "succeeded", job
    assert len(answers) >= 8
    committed = [hf_logprobs(engine_for_served(server, model_path, last_upto=k)) for k in range(job["step"] + 1)]
    assert min(max_diff(committed[0], c) for c in committed[1:]) > 1e-3  # the steps are distinguishable
    for latency, lps in answers:
        assert min(max_diff(lps, c) for c in committed) <= 1e-4, "an answer matches no committed step"
    # no request waits longer than one step plus its own work (4 clients share 2 cores: own work x4, + 0.25 s)
    history = server.request("GET", f"/mezo/jobs/{job['job_id']}")[1]
    longest_step_s = history["longest_step_ms"] / 1e3
    own_work = 4 * sorted(baseline)[len(baseline) // 2]
    worst = max(latency for latency, _ in answers)
    assert worst <= longest_step_s + own_work + 0.25, (worst, longest_step_s, own_work)


DECODE_PROMPTS = [[80, 82, 89, 76, 72, 224], [87, 75, 72, 224, 80]]


def decode(server, prompt: list[int], new_tokens: int = 12) -> tuple[list[int], list[float], list[dict]]:
    """Greedy decode; the generated tokens, the log-prob each had when it was chosen, and the weight versions
    that served them (SGLang's spans: ``{"version", "start", "end"}`` over the output tokens)."""
    status, out = server.request("POST", "/generate", {
        "input_ids": prompt, "return_logprob": True,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True},
    })
    assert status == 200, out
    entries = out["meta_info"]["output_token_logprobs"]
    return [e[1] for e in entries], [e[0] for e in entries], out["meta_info"]["weight_versions"]


def test_decoding_clients_are_served_to_the_end_by_committed_weights(server, model_path):
    """2 clients decode 12 tokens each, over and over, while a job runs. SGLang reports which weight version
    served which tokens; each token must have the log-prob that the weights of the committed step named there
    give it. No request waits longer than one step plus its own work (training yields to in-flight requests)."""
    stop = threading.Event()
    answers: list[tuple[float, list[int], list[int], list[float], list[dict]]] = []
    errors: list[BaseException] = []

    def client(prompt: list[int]) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                tokens, lps, versions = decode(server, prompt)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            answers.append((time.monotonic() - started, prompt, tokens, lps, versions))

    status, reset = server.request("POST", "/mezo/reset", {})  # from the base: earlier tests made logits huge
    assert status == 200, reset
    base_version = reset["weight_version"]
    own_work = max(min(timed(lambda: decode(server, p)) for _ in range(3)) for p in DECODE_PROMPTS)
    job = run_job_under_load(server, {"examples": TRAIN, "steps": 10, "lr": 1e-2, "eps": 1e-2, "batch_size": 2,
                                      "seed": 12}, [functools.partial(client, p) for p in DECODE_PROMPTS], stop)
    assert not errors, errors
    assert job["status"] == "succeeded", job
    assert len(answers) >= 6, len(answers)
    engines = [engine_for_served(server, model_path, last_upto=k) for k in range(job["step"] + 1)]
    step_of = {base_version: 0, **{f"mezo-{job['job_id']}-{k}": k for k in range(1, job["step"] + 1)}}
    seen_steps = set()
    for _, prompt, tokens, lps, versions in answers:
        expected = [hf_logprobs(e, [(prompt, tokens)])[0] for e in engines]
        assert versions[0]["start"] == 0 and versions[-1]["end"] == len(tokens), versions
        for span in versions:
            k = step_of[span["version"]]
            seen_steps.add(k)
            for t in range(span["start"], span["end"]):
                assert abs(expected[k][t] - lps[t]) <= 1e-4, (tokens, t, versions, lps[t], expected[k][t])
    assert len(seen_steps) >= 3, seen_steps  # the answers really came from weights that kept changing
    assert server.request("GET", "/mezo/weights")[1]["weight_version"] == f"mezo-{job['job_id']}-{job['step']}"
    history = server.request("GET", f"/mezo/jobs/{job['job_id']}")[1]
    worst = max(latency for latency, *_ in answers)
    assert worst <= history["longest_step_ms"] / 1e3 + 2 * own_work + 0.25, (worst, history["longest_step_ms"],
                                                                             own_work)


def timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def test_bad_input_is_refused_and_leaves_the_weights_alone(server, model_path):
    """Malformed JSON, empty example lists, NaN/inf/zero hyper-parameters, unknown fields, labels out of range,
    too many steps, prompts longer than the context: each a 400 with a message, and the weights untouched."""
    before = served_logprobs(server)
    cases = [
        (b"{not json", 400),
        (json.dumps({"examples": []}).encode(), 400),
        (json.dumps({"examples": TRAIN, "lr": float("nan")}).encode(), 400),
        (json.dumps({"examples": TRAIN, "eps": float("inf")}).encode(), 400),
        (json.dumps({"examples": TRAIN, "eps": 0}).encode(), 400),
        (json.dumps({"examples": TRAIN, "eps": 1e10}).encode(), 400),
        (json.dumps({"examples": TRAIN, "steps": 0}).encode(), 400),
        (json.dumps({"examples": TRAIN, "bogus": 1}).encode(), 400),
        (json.dumps({"examples": [{"prompt": "a", "options": ["x", "y"], "label": 2}]}).encode(), 400),
        (json.dumps({"examples": TRAIN, "steps": 5, "wait": True}).encode(), 400),
        (json.dumps({"examples": TRAIN, "steps": 10**6}).encode(), 400),
        (json.dumps({"examples": [{"prompt": "the movie " * 200, "completion": " great"}]}).encode(), 400),
        (json.dumps({"examples": TRAIN, "objective": "classification"}).encode(), 400),
        (json.dumps({"examples": TRAIN, "lr": 1.0, "weight_decay": 1.0}).encode(), 400),
    ]
    for body, expected in cases:
        req = urllib.request.Request(server.url + "/mezo/step", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        assert status == expected, (body[:80], status, text)
        # SGLang's app answers validation errors with 400 and an OpenAI-style {"message": ...}; ours use "detail"
        error = json.loads(text)
        assert error.get("message") or error.get("detail"), text
    assert server.request("GET", "/mezo/jobs/nope")[0] == 404
    assert server.request("POST", "/mezo/jobs/nope/cancel")[0] == 404
    assert served_logprobs(server) == before


def test_cancel_and_disconnect_leave_the_weights_at_a_committed_step(server, model_path):
    status, job = server.request("POST", "/mezo/step", {"examples": TRAIN, "steps": 500, "lr": 1e-2,
                                                         "batch_size": 2, "seed": 21})
    assert status == 200
    while server.request("GET", f"/mezo/jobs/{job['job_id']}")[1]["step"] < 3:
        time.sleep(0.05)
    status, cancelled = server.request("POST", f"/mezo/jobs/{job['job_id']}/cancel")
    assert status == 200
    while cancelled["status"] == "running":
        time.sleep(0.05)
        cancelled = server.request("GET", f"/mezo/jobs/{job['job_id']}")[1]
    assert cancelled["status"] == "cancelled" and 3 <= cancelled["step"] < 500, cancelled
    assert max_diff(served_logprobs(server), hf_logprobs(engine_for_served(server, model_path))) <= 1e-4

    # clients that hang up: one right after sending a job, one that was waiting ("wait": true) for a job queued
    # behind another; each job still runs to its end, and the weights are there
    host, port = server.url.removeprefix("http://").split(":")
    for body, ahead in [({"steps": 5, "seed": 22}, None), ({"steps": 1, "seed": 23, "wait": True}, 8)]:
        if ahead:
            status, _ = server.request("POST", "/mezo/step", {"examples": TRAIN, "steps": ahead, "lr": 1e-2,
                                                             "batch_size": 2, "seed": 24})
            assert status == 200
        n_jobs = len(server.request("GET", "/mezo/jobs")[1]["jobs"])
        raw = json.dumps({"examples": TRAIN, "lr": 1e-2, "batch_size": 2, **body}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /mezo/step HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n".encode() + raw)
            while len(server.request("GET", "/mezo/jobs")[1]["jobs"]) == n_jobs:  # accepted: now hang up
                time.sleep(0.02)
        deadline = time.monotonic() + 120
        while True:
            jobs = server.request("GET", "/mezo/jobs")[1]["jobs"]
            if jobs[-1]["status"] not in ("queued", "running"):
                break
            assert time.monotonic() < deadline, jobs[-1]
            time.sleep(0.05)
        assert jobs[-1]["status"] == "succeeded" and jobs[-1]["step"] == body["steps"], jobs[-1]
    assert max_diff(served_logprobs(server), hf_logprobs(engine_for_served(server, model_path))) <= 1e-4
