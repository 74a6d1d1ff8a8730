"""The ``/mezo/*`` routes (``sglang_mezo.server.routes``) on a plain FastAPI app with FastAPI's TestClient: the real
job runner over a fake executor (real steps on a tiny model in this process) and a character tokenizer. Every
status of the error table (``sglang_mezo.server.errors``) is provoked here, with its body."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
import zstandard
from fakes import mezo_app
from fastapi.testclient import TestClient

from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.kernels import ZKind
from sglang_mezo.options import Folders, Limits
from sglang_mezo.protocol import FailureKind
from sglang_mezo.server.errors import STATUS

TRAIN = [{"prompt": "the movie was", "completion": " great"}, {"prompt": "the film was", "completion": " bad"},
         {"prompt": "a story with", "completion": " music"}]
CHOICES = [{"prompt": "great film. It was", "options": [" bad", " good"], "label": 1},
           {"prompt": "dull film. It was", "options": [" bad", " good"], "label": 0}]
MAX_STEPS = 50
CONTEXT = 64  # the tiny model's positions
LIMITS = Limits(max_steps_per_job=MAX_STEPS)


@pytest.fixture
def api(tmp_path):
    app, executor = mezo_app(tmp_path, limits=LIMITS, context_len=CONTEXT)
    with TestClient(app) as client:
        yield client, executor


def follow(client: TestClient, job: dict, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
        job = client.get(f"/mezo/jobs/{job['job_id']}").json()
    return job


def assert_error(response, status: int, kind: str, *words: str) -> None:
    body = response.json()
    assert response.status_code == status, body
    assert body["object"] == "error" and body["type"] == kind and body["code"] == status, body
    for word in words:
        assert word in body["message"], body


def test_a_job_is_submitted_followed_and_its_results_read(api):
    client, executor = api
    response = client.post("/mezo/step", json={"examples": CHOICES, "eval_examples": CHOICES, "eval_every": 2,
                                               "steps": 4, "batch_size": 2, "seed": 3})
    assert response.status_code == 200, response.json()
    job = follow(client, response.json())
    assert job["status"] == "succeeded" and job["step"] == job["total_steps"] == 4, job
    assert [e["step"] for e in job["evals"]] == [0, 2, 4] and job["best_eval"] in job["evals"]
    assert all(e["accuracy"] is not None for e in job["evals"])
    last = job["last"]
    assert last["step"] == 3 and last["loss"] == pytest.approx((sum(last["loss_plus"]) + sum(last["loss_minus"])) / 2)
    assert job["error"] is None and job["error_kind"] is None and job["eta_s"] is None

    history = client.get(f"/mezo/jobs/{job['job_id']}/history").json()
    assert [s["step"] for s in history["steps"]] == [0, 1, 2, 3] and history["steps"][-1] == last
    assert history["evals"] == job["evals"]
    trajectory = Trajectory.from_dict(client.get(f"/mezo/jobs/{job['job_id']}/trajectory").json())
    assert trajectory.committed_steps == 4 and trajectory.z_kind is ZKind.RADEMACHER
    assert client.get("/mezo/jobs").json()["jobs"] == [job]
    weights = client.get("/mezo/weights").json()
    assert weights["weight_version"] == f"mezo-{job['job_id']}-4" == job["evals"][-1]["weight_version"]
    assert weights["history"] == [{"job_id": job["job_id"], "steps": 4, "records": 4}]

    plot = client.get(f"/mezo/jobs/{job['job_id']}/plot")
    assert plot.headers["content-type"] == "image/png" and plot.content.startswith(b"\x89PNG")
    with client.stream("GET", f"/mezo/jobs/{job['job_id']}/events") as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[0] == "event: end" and json.loads(lines[1].removeprefix("data: ")) == job


def test_wait_returns_the_step_and_eval_and_diagnose_measure_without_changing(api):
    client, executor = api
    step = client.post("/mezo/step", json={"examples": TRAIN, "steps": 1, "wait": True, "lr": 0.0}).json()
    assert step["step"] == 0 and len(step["loss_plus"]) == 1 and step["projected_grads"][0] != 0.0, step
    before = executor.weights()
    evaluated = client.post("/mezo/eval", json={"examples": TRAIN, "generate": True}).json()
    assert evaluated["n"] == 3 and evaluated["accuracy"] is None and 0 <= evaluated["f1"] <= 1, evaluated
    assert evaluated["weight_version"] == client.get("/mezo/weights").json()["weight_version"]
    diagnosis = client.post("/mezo/diagnose", json={"examples": CHOICES, "eps": [1e-4, 1e-2], "probes": 3}).json()
    assert diagnosis["objective"] == "classification" and [r["eps"] for r in diagnosis["results"]] == [1e-4, 1e-2]
    small, large = diagnosis["results"]
    assert large["median_abs_loss_diff"] > small["median_abs_loss_diff"] > 0
    for name, tensor in executor.weights().items():  # lr = 0: only the probes' fp32 round trips
        assert (tensor - before[name]).abs().max() <= 1e-6, name


def test_a_job_reads_its_examples_from_a_data_file(api, tmp_path):
    client, _ = api
    data = tmp_path / "data" / "reviews.jsonl"
    data.write_text("".join(json.dumps({"review": f"film {i}", "stars": "high" if i % 2 else "low"}) + "\n"
                            for i in range(10)))
    dataset = {"path": "reviews.jsonl", "eval_size": 2,
               "template": {"kind": "classification", "prompt": "{review}. It was", "label_field": "stars",
                            "labels": ["low", "high"]}}
    job = follow(client, client.post("/mezo/step", json={"dataset": dataset, "steps": 2, "batch_size": 3}).json())
    assert job["status"] == "succeeded" and [e["n"] for e in job["evals"]] == [4, 4], job
    assert client.post("/mezo/eval", json={"dataset": dataset}).json()["n"] == 4
    assert_error(client.post("/mezo/step", json={"dataset": {**dataset, "path": "nope.jsonl"}}),
                 400, "invalid_request", "no such file")
    absolute = client.post("/mezo/eval", json={"dataset": {**dataset, "path": str(data)}})
    assert absolute.status_code == 200 and absolute.json()["n"] == 4  # absolute, inside the data folder


@pytest.mark.parametrize("body, words", [
    ({"examples": []}, ["either examples"]),
    ({"examples": TRAIN, "bogus": 1}, ["bogus"]),
    ({"examples": TRAIN, "eps": 0}, ["eps"]),
    ({"examples": TRAIN, "steps": MAX_STEPS + 1}, ["--mezo-max-steps-per-job"]),
    ({"examples": [{"prompt": "x" * CONTEXT, "completion": " y"}]}, ["context length"]),
    ({"examples": TRAIN, "objective": "classification"}, ["does not fit"]),
    ({"examples": [{"prompt": "a", "options": ["x", "y"], "label": 2}]}, ["label 2"]),
    ({"examples": TRAIN, "lr": 1.0, "weight_decay": 1.0}, ["lr * weight_decay"]),
    ({"examples": TRAIN, "chat": True}, ["no chat template"]),
    ({"examples": TRAIN, "estimator": "fzoo", "n_probes": 1}, ["n_probes >= 2"]),
    ({"examples": TRAIN, "objective": "dpo"}, ["preference pairs"]),
    ({"examples": [{"prompt": "a", "options": ["x", "y"], "label": 1}], "objective": "dpo"}, ["preference pairs"]),
])
def test_invalid_requests_are_400s_that_say_why(api, body, words):
    client, executor = api
    before = executor.weights()
    assert_error(client.post("/mezo/step", json=body), 400, "invalid_request", *words)
    assert client.get("/mezo/jobs").json()["jobs"] == []
    assert all((executor.weights()[k] == v).all() for k, v in before.items())


def test_every_other_status_of_the_error_table(api, tmp_path):
    client, executor = api
    for path in ("/mezo/eval", "/mezo/diagnose"):  # DPO needs pairs: a 400, not the scorer's crash
        assert_error(client.post(path, json={"examples": [{"prompt": "a", "options": ["x", "y"], "label": 1}],
                                             "objective": "dpo"}), 400, "invalid_request", "preference pairs")
    assert_error(client.post("/mezo/step", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "invalid_request")
    assert_error(client.post("/mezo/step", content=b'{"examples": [], "lr": NaN}',
                             headers={"content-type": "application/json"}), 400, "invalid_request", "lr")
    for method, path in [("GET", "/mezo/jobs/nope"), ("GET", "/mezo/jobs/nope/history"),
                         ("POST", "/mezo/jobs/nope/cancel"), ("GET", "/mezo/jobs/nope/events")]:
        assert_error(client.request(method, path), 404, "not_found", "nope")
    assert_error(client.post("/mezo/reset", json={"job_id": "nope"}), 404, "not_found")
    assert_error(client.post("/mezo/reset", json={"step": 3}), 400, "invalid_request", "job_id")

    executor.faults.raise_at.add(("*", 0))
    assert_error(client.post("/mezo/step", json={"examples": TRAIN, "wait": True}), 422, "job_failed",
                 "scorer failed")
    failed = client.get("/mezo/jobs").json()["jobs"][-1]
    assert failed["status"] == "failed" and failed["error_kind"] == FailureKind.STEP_FAILED.value
    assert_error(client.get(f"/mezo/jobs/{failed['job_id']}/plot"), 409, "conflict", "nothing to plot")
    aborted = client.get(f"/mezo/jobs/{failed['job_id']}/trajectory").json()["steps"]["aborted_passes"]
    assert aborted == [2]  # no committed step, but the failed step's probe passes moved the weights

    executor.faults.restore = FailureKind.CHECKPOINT
    assert_error(client.post("/mezo/reset", json={}), 503, "unavailable", "restore failed")

    executor.gate = threading.Event()  # the next job waits at its first chunk
    running = client.post("/mezo/step", json={"examples": TRAIN, "steps": 3}).json()
    assert_error(client.post("/mezo/reset", json={}), 409, "conflict", "queued or running")
    client.post(f"/mezo/jobs/{running['job_id']}/cancel")
    executor.gate.set()
    assert follow(client, running)["status"] == "cancelled"

    saved = client.post("/mezo/save", json={"path": "ck"}).json()
    assert saved["weight_version"] == client.get("/mezo/weights").json()["weight_version"], saved
    assert saved["path"] == str(tmp_path / "out" / "ck") and (tmp_path / "out" / "ck" / "mezo_history.json").exists()
    assert_error(client.post("/mezo/save", json={"path": "ck"}), 409, "conflict", "set overwrite")


def test_the_api_describes_itself(api):
    client, _ = api
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/mezo/step", "/mezo/jobs", "/mezo/jobs/{job_id}", "/mezo/jobs/{job_id}/history",
                          "/mezo/jobs/{job_id}/plot", "/mezo/jobs/{job_id}/events", "/mezo/jobs/{job_id}/cancel",
                          "/mezo/jobs/{job_id}/trajectory", "/mezo/eval", "/mezo/diagnose", "/mezo/weights",
                          "/mezo/reset", "/mezo/save",
                          # a fleet as this server sees it (what its servers send each other is left out)
                          "/mezo/fleet",
                          # OpenAI's fine-tuning API over the same jobs
                          "/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/fine_tuning/jobs",
                          "/v1/fine_tuning/jobs/{job_id}", "/v1/fine_tuning/jobs/{job_id}/cancel",
                          "/v1/fine_tuning/jobs/{job_id}/checkpoints", "/v1/fine_tuning/jobs/{job_id}/events",
                          "/v1/models", "/v1/models/{model}"}
    assert_error(client.get("/mezo/fleet"), 404, "not_found", "not in a fleet")
    step = paths["/mezo/step"]["post"]
    assert step["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/StepRequest")


def test_the_readme_error_table_is_the_servers():
    """README's "Errors" table lists every status and kind the server answers with, and no other."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = set(re.findall(r"^\s*\| (\d{3}) \| `(\w+)` \|", readme, flags=re.M))
    assert rows == {(str(status), cls.kind) for cls, status in STATUS.items()}


ADMIN, NORMAL = ("POST", "/mezo/reset", {"job_id": "nope"}), ("GET", "/v1/models/nope", None)
# (api key, admin key) -> per route kind, per token sent: allowed, or SGLang's 401/403
AUTH = {
    (None, None): {"admin": {None: True, "A": True, "B": True, "X": True},
                   "normal": {None: True, "A": True, "B": True, "X": True}},
    ("A", None): {"admin": {None: 401, "A": True, "B": 401, "X": 401},
                  "normal": {None: 401, "A": True, "B": 401, "X": 401}},
    (None, "B"): {"admin": {None: 401, "A": 401, "B": True, "X": 401},
                  "normal": {None: True, "A": True, "B": True, "X": True}},
    ("A", "B"): {"admin": {None: 401, "A": 401, "B": True, "X": 401},
                 "normal": {None: 401, "A": True, "B": 401, "X": 401}},
}


@pytest.mark.parametrize("keys", AUTH, ids=lambda k: f"api={k[0]},admin={k[1]}")
def test_routes_that_change_or_read_the_server_are_admin_routes(keys, tmp_path):
    """SGLang's own key middleware on the app (as SGLang adds it with --api-key/--admin-api-key): the admin routes
    (train, evaluate, diagnose, reset, save, cancel, and every read of jobs, their events and files) need the admin
    key where there is one; the models a client may name need the API key where there is one."""
    from sglang.srt.utils.auth import add_api_key_middleware

    app, _ = mezo_app(tmp_path)
    add_api_key_middleware(app, api_key=keys[0], admin_api_key=keys[1])
    with TestClient(app) as client:
        for kind, (method, path, body) in (("admin", ADMIN), ("normal", NORMAL)):
            for token, expected in AUTH[keys][kind].items():
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                response = client.request(method, path, json=body, headers=headers)
                allowed = response.status_code == 404  # reached the route: the job does not exist
                assert (allowed if expected is True else response.status_code == expected), (kind, token, response)


def test_each_route_declares_its_auth_level():
    """SGLang's rule, read off its own routes: what changes the server, or reads the operator's data and state
    (``/list_external_corpora``, ``/get_weights_by_name``), is ADMIN_OPTIONAL; the inference surface is NORMAL. Our
    jobs, their events and the uploaded files are the operator's; the served version and the model names a client
    sends are the inference surface's."""
    from sglang.srt.utils.auth import AuthLevel

    from sglang_mezo.server.fine_tuning.routes import models_router, router
    from sglang_mezo.server.routes import ROUTERS

    levels = {(next(iter(r.methods)), r.path): r.endpoint._auth_level
              for group in (*ROUTERS, router, models_router) for r in group.routes}
    normal = {("GET", "/mezo/weights"), ("GET", "/v1/models"), ("GET", "/v1/models/{model:path}")}
    assert normal <= set(levels), set(levels)
    assert {k for k, v in levels.items() if v is AuthLevel.NORMAL} == normal
    assert all(v is AuthLevel.ADMIN_OPTIONAL for k, v in levels.items() if k not in normal)


SECRET = "hunter2"


def test_files_only_where_the_operator_allows(api, tmp_path):
    """Data files are read only inside --mezo-data-dir (after ``..`` and symlinks), checkpoints are written only
    inside --mezo-output-dir, as a name, and only a folder an earlier save wrote is ever replaced; no message quotes a
    file."""
    client, executor = api
    (tmp_path / "secret.csv").write_text(f"root:{SECRET}:0:0\nuser:{SECRET}:1:1\n")
    (tmp_path / "data" / "escape").symlink_to(tmp_path / "secret.csv")
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "inside.csv").write_text(f"{SECRET},b\n1,2\n")
    template = {"kind": "generation", "prompt": "{a}", "completion": " {b}"}
    for path in [str(tmp_path / "secret.csv"), "../secret.csv", "escape", "sub/../../secret.csv", "/etc/passwd"]:
        response = client.post("/mezo/eval", json={"dataset": {"path": path, "format": "csv", "template": template}})
        assert_error(response, 403, "forbidden", "--mezo-data-dir")
        assert SECRET not in response.text and ":0:0" not in response.text
    inside = client.post("/mezo/eval", json={"dataset": {"path": "sub/../inside.csv", "template": template}})
    assert_error(inside, 400, "invalid_request", "inside.csv, line 2", "needs field(s) ['a']")
    assert SECRET not in inside.text

    weights = executor.weights()
    (tmp_path / "out" / "foreign").mkdir()
    (tmp_path / "out" / "to-base").symlink_to(tmp_path / "base")
    for name, status, kind, words in [
        (str(tmp_path / "out" / "x"), 400, "invalid_request", ["relative"]),
        ("../x", 403, "forbidden", ["--mezo-output-dir"]),
        ("to-base", 403, "forbidden", ["--mezo-output-dir"]),
        ("foreign", 409, "conflict", ["not written by sglang-mezo"]),
        ("x" * 5000, 400, "invalid_request", ["too long", "(5000 characters)"]),  # was a 503 from mkdir
        ("a/" + "é" * 120, 400, "invalid_request", ["too long", "bytes a folder"]),
    ]:
        for overwrite in (False, True):
            assert_error(client.post("/mezo/save", json={"path": name, "overwrite": overwrite}), status, kind, *words)
    assert not (tmp_path / "x").exists() and list((tmp_path / "out" / "foreign").iterdir()) == []
    assert client.post("/mezo/save", json={"path": "nested/ck"}).status_code == 200
    (tmp_path / "out" / "nested" / "ck" / "stale").write_text("from before")
    assert client.post("/mezo/save", json={"path": "nested/ck", "overwrite": True}).status_code == 200
    assert not (tmp_path / "out" / "nested" / "ck" / "stale").exists()  # replaced, not merged
    assert all(torch.equal(t, weights[k]) for k, t in executor.weights().items())


def test_without_folders_file_access_is_off(tmp_path):
    app, _ = mezo_app(tmp_path, folders=Folders())
    with TestClient(app) as client:
        template = {"kind": "generation", "prompt": "{a}", "completion": " {b}"}
        assert_error(client.post("/mezo/step", json={"dataset": {"path": "x.csv", "template": template}}),
                     403, "forbidden", "started without --mezo-data-dir")
        assert_error(client.post("/mezo/save", json={"path": "ck"}), 403, "forbidden",
                     "started without --mezo-output-dir")


def test_each_limit_is_refused_with_its_flag_and_the_server_unchanged(tmp_path):
    limits = Limits(max_steps_per_job=5, max_examples_per_job=3, max_tokens_per_job=100, max_probes=2,
                    max_queued_jobs=1, max_event_streams=1, max_body_mb=1)
    app, executor = mezo_app(tmp_path, limits=limits)
    weights = executor.weights()
    with TestClient(app) as client:
        for body, flag in [({"examples": TRAIN, "steps": 6}, "--mezo-max-steps-per-job"),
                           ({"examples": TRAIN + TRAIN[:1]}, "--mezo-max-examples-per-job"),
                           ({"examples": TRAIN, "eval_examples": TRAIN[:1]}, "--mezo-max-examples-per-job"),
                           ({"examples": [{"prompt": "x" * 40, "completion": " y" * 10}] * 3},
                            "--mezo-max-tokens-per-job"),
                           ({"examples": TRAIN, "n_probes": 3}, "--mezo-max-probes")]:
            assert_error(client.post("/mezo/step", json=body), 400, "invalid_request", flag)
        for body, flag in [({"examples": CHOICES, "probes": 6}, "--mezo-max-steps-per-job"),
                           ({"examples": CHOICES * 2}, "--mezo-max-examples-per-job")]:
            assert_error(client.post("/mezo/diagnose", json={"probes": 2, **body}), 400, "invalid_request", flag)
        too_large = client.post("/mezo/step", content=b"{" + b" " * (2 << 20) + b"}",
                                headers={"content-type": "application/json"})
        assert_error(too_large, 413, "too_large", "--mezo-max-body-mb")
        assert client.get("/mezo/jobs").json()["jobs"] == []

        executor.gate = threading.Event()  # the one job allowed stays running
        job = client.post("/mezo/step", json={"examples": TRAIN, "steps": 2}).json()
        assert_error(client.post("/mezo/step", json={"examples": TRAIN}), 429, "too_many", "--mezo-max-queued-jobs")
        assert_error(client.post("/mezo/diagnose", json={"examples": CHOICES, "probes": 2}), 429, "too_many")
        with client.stream("GET", f"/mezo/jobs/{job['job_id']}/events") as first:
            lines = first.iter_lines()
            assert next(lines) == "event: status"  # open, holding the one slot
            assert_error(client.get(f"/mezo/jobs/{job['job_id']}/events"), 429, "too_many",
                         "--mezo-max-event-streams")
            executor.gate.set()
            assert "event: end" in list(lines)  # the job ends, and so does its stream
        assert follow(client, job)["status"] == "succeeded"
        with client.stream("GET", f"/mezo/jobs/{job['job_id']}/events") as again:  # the slot came back
            assert next(again.iter_lines()) == "event: end"
    assert len(executor.chunks) == 2 and weights.keys() == executor.weights().keys()


def test_a_save_that_fails_leaves_the_earlier_checkpoint_of_that_name(api, tmp_path):
    client, executor = api
    assert client.post("/mezo/save", json={"path": "ck"}).status_code == 200
    before = sorted(p.name for p in (tmp_path / "out" / "ck").iterdir())
    executor.faults.save = FailureKind.CHECKPOINT
    assert_error(client.post("/mezo/save", json={"path": "ck", "overwrite": True}), 503, "unavailable",
                 "the save failed")
    assert sorted(p.name for p in (tmp_path / "out" / "ck").iterdir()) == before
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ck"]  # no staging folder left behind


def test_data_that_could_reach_outside_or_break_a_reader_is_refused(api, tmp_path):
    client, _ = api
    import datasets

    template = {"kind": "classification", "prompt": "{text} It was"}
    saved = tmp_path / "data" / "saved"
    datasets.Dataset.from_list([{"text": "a", "label": 0}, {"text": "b", "label": 1}]).save_to_disk(str(saved))
    assert client.post("/mezo/eval", json={"dataset": {"path": "saved", "template": template}}).status_code == 200
    (saved / "escape").symlink_to(tmp_path / "secret.csv")  # a link inside the folder, out of it
    assert_error(client.post("/mezo/eval", json={"dataset": {"path": "saved", "template": template}}), 403,
                 "forbidden", "--mezo-data-dir")
    (saved / "escape").unlink()
    original = (saved / "state.json").read_text()
    state = json.loads(original)
    state["_data_files"][0]["filename"] = "../../secret.arrow"  # a file the loader would open, out of it
    (saved / "state.json").write_text(json.dumps(state))
    assert_error(client.post("/mezo/eval", json={"dataset": {"path": "saved", "template": template}}), 403,
                 "forbidden")
    (saved / "state.json").write_text(original)
    assert_error(client.post("/mezo/eval", json={"dataset": {"path": "saved", "format": "parquet",
                                                              "template": template}}), 400, "invalid_request",
                 "only a datasets folder")
    (tmp_path / "data" / "inf.jsonl").write_text('{"text": "a", "label": Infinity}\n')
    assert_error(client.post("/mezo/eval", json={"dataset": {"path": "inf.jsonl", "template": template}}), 400,
                 "invalid_request", "inf.jsonl, line 1", "not a class index")


def test_a_streamed_body_over_the_limit_is_a_413(tmp_path):
    app, _ = mezo_app(tmp_path, limits=Limits(max_body_mb=1))

    def chunks():  # no Content-Length: the bytes are counted as they come
        yield b'{"examples": ['
        for _ in range(2 << 10):
            yield b'{"prompt": "' + b"x" * 1000 + b'", "completion": " y"},'
        yield b"]}"

    with TestClient(app) as client:
        response = client.post("/mezo/step", content=chunks(), headers={"content-type": "application/json"})
        assert_error(response, 413, "too_large", "--mezo-max-body-mb")


@pytest.mark.parametrize("encode", [
    lambda body: (json.dumps(body).encode(), {}),
    # JSON may spell the name with escapes: still read as the name it is
    lambda body: (json.dumps(body).replace("ft:", "\\u0066\\u0074:").encode(), {}),
    # SGLang's request decompression runs inside the check: the check reads the compressed body too
    lambda body: (zstandard.ZstdCompressor().compress(json.dumps(body).encode()), {"x-body-compressed": "zstd"}),
], ids=["plain", "escaped", "zstd"])
def test_a_chat_request_naming_an_unknown_fine_tuned_model_is_refused_however_it_is_written(api, encode):
    client, _ = api
    body, headers = encode({"model": "ft:fake-model:x:ftjob-0", "messages": [{"role": "user", "content": "hi"}]})
    response = client.post("/v1/chat/completions", content=body,
                           headers={"content-type": "application/json", **headers})
    assert_error(response, 404, "not_found", "ft:fake-model:x:ftjob-0")
    # the base name passes on to SGLang's route (which this fake app does not have)
    body, headers = encode({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
    passed = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json", **headers})
    assert passed.status_code == 404 and passed.json() == {"detail": "Not Found"}


def test_the_only_decompression_sglang_does_is_the_one_read_here():
    """The check above decompresses what SGLang's request decompression would; a method SGLang adds would pass it
    unread."""
    from sglang.srt.entrypoints.http_request_decompression import _DECOMPRESSORS

    assert set(_DECOMPRESSORS) == {"zstd"}
