"""The Python client (``sglang_mezo.client``) over real HTTP: uvicorn serves the ``/mezo/*`` routes in a thread
(the real job runner over the fake executor of the unit tests), and the client trains, evaluates, resets, saves and
reports errors as the server gives them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakes import mezo_app, served
from servers import free_port

from sglang_mezo.client import MezoClient, MezoError, format_job

CHOICES = [{"prompt": "great film. It was", "options": [" bad", " good"], "label": 1},
           {"prompt": "dull film. It was", "options": [" bad", " good"], "label": 0}]


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[MezoClient]:
    app, _ = mezo_app(tmp_path_factory.mktemp("api"))
    with served(app) as url:
        yield MezoClient(url, timeout_s=30)


def test_train_follows_a_job_to_its_end_and_keeps_what_it_produced(client):
    status = client.train({"examples": CHOICES, "eval_examples": CHOICES, "eval_every": 2, "steps": 4,
                           "batch_size": 2, "wait": True}, progress=False)
    assert status["status"] == "succeeded" and status["step"] == 4, status
    assert client.job(status["job_id"]) == status and client.jobs()[-1] == status
    table = format_job(status)
    best = status["best_eval"]["step"]
    assert f"job {status['job_id']}: succeeded after 4/4 steps" in table and f"| {best} (best) |" in table
    assert "zero-gradient probes" in table
    assert client.trajectory(status["job_id"])["steps"]["step"] == [0, 1, 2, 3]
    assert client.evaluate(CHOICES)["weight_version"] == client.weights()["weight_version"]
    assert client.reset(status["job_id"], best)["weight_version"] == status["best_eval"]["weight_version"]
    saved = client.save("best")
    assert saved["weight_version"] == status["best_eval"]["weight_version"] and saved["path"].endswith("/out/best")
    assert client.reset()["history"] == []


def test_errors_carry_the_status_and_the_servers_message(client):
    with pytest.raises(MezoError) as refused:
        client.submit({"examples": []})
    assert refused.value.status == 400 and "either examples" in str(refused.value)
    with pytest.raises(MezoError) as missing:
        client.job("nope")
    assert missing.value.status == 404 and "nope" in str(missing.value)
    reply = client.request("GET", "/mezo/jobs/nope")  # any status is a reply, not an exception
    assert reply.status == 404 and reply.body["type"] == "not_found" and "nope" in reply.message
    assert client.request("GET", "/nowhere").status == 404
    with pytest.raises(OSError):
        MezoClient(f"http://127.0.0.1:{free_port()}", timeout_s=5).jobs()
