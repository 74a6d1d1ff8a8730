"""OpenAI's fine-tuning API on a real SGLang server on CPU, driven by the unmodified ``openai`` client (the version
SGLang's pins install): upload, create, follow, events, checkpoints, chat with the fine-tuned model (answered by its
weights, refused when they are not served), a DPO job, cancel, and every kind of bad file."""

from __future__ import annotations

import json
import math
import time

import httpx
import openai
import pytest
from servers import PAPER_STEP, running_server
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.server  # starts real SGLang servers

CHAT = [{"messages": [{"role": "system", "content": "You rate films."}, {"role": "user", "content": f"the film {w}"},
                      {"role": "assistant", "content": "great" if good else "bad"}]}
        for w, good in [("was great", True), ("was bad", False), ("had a great cast", True),
                        ("was a boring mess", False), ("was fun", True), ("was terrible", False)]]
HELD_OUT = CHAT[:2]
PREFERENCES = [{"input": {"messages": [{"role": "user", "content": f"the movie {w}"}]},
                "preferred_output": [{"role": "assistant", "content": good}],
                "non_preferred_output": [{"role": "assistant", "content": bad}]}
               for w, good, bad in [("was great", "great", "bad"), ("was bad", "bad", "great"),
                                    ("was fun", "great", "bad"), ("was dull", "bad", "great")]]


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=7)
    data = tmp_path_factory.mktemp("data")
    with running_server(model, *PAPER_STEP, "--mezo-z-kind", "gaussian", "--mezo-lr", "1e-2", "--mezo-eps", "1e-2",
                        "--mezo-data-dir", str(data), log_dir=tmp_path_factory.mktemp("logs")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def finished(client: openai.OpenAI, job_id: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def test_files_upload_list_read_and_delete(client):
    uploaded = client.files.create(file=("chat.jsonl", jsonl(CHAT)), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(jsonl(CHAT)) and uploaded.filename == "chat.jsonl"
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.retrieve(uploaded.id).purpose == "fine-tune"
    assert client.files.content(uploaded.id).read() == jsonl(CHAT)
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", jsonl(CHAT)), purpose="batch")


def test_a_chat_job_trains_and_its_model_is_served_by_its_weights(server, client):
    training = client.files.create(file=("chat.jsonl", jsonl(CHAT)), purpose="fine-tune")
    validation = client.files.create(file=("held-out.jsonl", jsonl(HELD_OUT)), purpose="fine-tune")
    base = client.models.list().data[0].id
    assert "tiny-llama" in base  # SGLang's name for the served model (its path), not the server args' unset one
    created = client.fine_tuning.jobs.create(
        model=base, training_file=training.id, validation_file=validation.id, suffix="films", seed=3,
        hyperparameters={"n_epochs": 3, "batch_size": 3, "learning_rate_multiplier": 2}, metadata={"team": "a"},
        extra_body={"mezo": {"eval_every": 2, "n_probes": 2}})
    assert created.status in ("validating_files", "queued", "running")
    job = finished(client, created.id)
    assert job.status == "succeeded", job.error
    # 6 examples, batch 3: 2 steps an epoch, 3 epochs; lr = 2 x --mezo-lr
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 3 and job.steps == 6
    assert job.fine_tuned_model == f"ft:{base.rsplit('/', 1)[-1]}:films:{job.id}" and job.metadata == {"team": "a"}
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    mezo_job = server.request("GET", f"/mezo/jobs/{job.mezo_job_id}/history")[1]
    assert len(mezo_job["steps"]) == 6 and all(s["lr"] == pytest.approx(2e-2) for s in mezo_job["steps"])
    metrics_file, trajectory_file = (client.files.retrieve(i) for i in job.result_files)
    assert metrics_file.purpose == trajectory_file.purpose == "fine-tune-results"
    rows = client.files.content(metrics_file.id).read().decode().splitlines()
    assert rows[0].startswith("step,train_loss,valid_loss") and [r.split(",")[0] for r in rows[1:]] == \
        [str(k) for k in range(1, 7)]
    assert [float(r.split(",")[1]) for r in rows[1:]] == [s["loss"] for s in mezo_job["steps"]]
    assert json.loads(client.files.content(trajectory_file.id).read()) == \
        server.request("GET", f"/mezo/jobs/{job.mezo_job_id}/trajectory")[1]

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message.startswith("The job has successfully completed")  # newest first
    assert any(e.type == "metrics" and e.data.get("step") == 6 and "train_loss" in e.data for e in events)
    page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    after = client.fine_tuning.jobs.list_events(job.id, limit=2, after=page.data[-1].id)
    assert after.data[0].id == events[2].id

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 4, 2]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-6"
    assert all(math.isfinite(c.metrics.valid_loss) for c in checkpoints)

    names = [m.id for m in client.models.list().data]
    assert names[0] == base and job.fine_tuned_model in names
    assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model

    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "the film was great"}])
    assert reply.to_dict()["metadata"]["weight_version"] == job.weight_version == f"mezo-{job.mezo_job_id}-6"
    assert server.request("GET", "/mezo/weights")[1]["weight_version"] == job.weight_version

    # a checkpoint is a model name too, but only while its weights are served: restore it first
    with pytest.raises(openai.ConflictError, match="not being served"):
        client.chat.completions.create(model=checkpoints[1].fine_tuned_model_checkpoint, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert server.request("POST", "/mezo/reset", {"job_id": job.mezo_job_id, "step": 4})[0] == 200
    reply = client.completions.create(model=checkpoints[1].fine_tuned_model_checkpoint, prompt="the film", max_tokens=2)
    assert reply.to_dict()["metadata"]["weight_version"] == checkpoints[1].weight_version
    with pytest.raises(openai.ConflictError):
        client.chat.completions.create(model=job.fine_tuned_model, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ft:nope:x:ftjob-0", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=5).data]
    server.request("POST", "/mezo/reset", {})


def test_a_dpo_job_moves_the_margins_towards_the_preferred_answers(server, client):
    training = client.files.create(file=("prefs.jsonl", jsonl(PREFERENCES)), purpose="fine-tune")
    base = client.models.list().data[0].id
    job = client.fine_tuning.jobs.create(
        model=base, training_file=training.id, validation_file=training.id, seed=1,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": 10, "batch_size": 4,
                                                           "learning_rate_multiplier": 0.1}}},
        extra_body={"mezo": {"eval_every": 5}})
    job = finished(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "dpo" and job.hyperparameters.beta == 0.5
    history = server.request("GET", f"/mezo/jobs/{job.mezo_job_id}/history")[1]
    losses = [e["loss"] for e in history["evals"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-9)  # π_ref is the starting model: every margin is 0
    # the steps score through the scheduler, not the evaluation's path: their first loss, the mean of L(θ±εz), is
    # log 2 up to ε² too only if both paths read the same tokens' log-probs
    assert history["steps"][0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    # every step's batch is all 4 pairs and so is the evaluation: to first order in lr, an SPSA step lowers the very
    # loss it estimated (its change is -lr·g·(∇L·z) with g ≈ ∇L·z), so the margins must have moved the right way
    assert losses[-1] < losses[1] < losses[0], losses

    # the same flow as a chat job's: events, checkpoints, and the fine-tuned name served by its weights
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message.startswith("The job has successfully completed")
    first = [e.message for e in events[::-1][:5]]
    assert first[:3] + first[4:] == [
        f"Created fine-tuning job: {job.id}", f"Validating training file: {training.id}",
        f"Files validated; {job.steps} MeZO steps queued as /mezo job {job.mezo_job_id}", "Fine-tuning job started"]
    # the flags set lr, ε and the step rule (and a multiplier scaled the lr); the recipe the rest
    assert first[3].startswith("MeZO settings (scaled): trains the set named by the flag") and "(flag)" in first[3]
    assert [e.data["valid_loss"] for e in events[::-1] if e.type == "metrics" and "valid_loss" in e.data] == losses
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [10, 5]
    assert [c.metrics.valid_loss for c in checkpoints] == losses[:0:-1]
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=2, temperature=0,
                                           messages=[{"role": "user", "content": "the movie was great"}])
    assert reply.to_dict()["metadata"]["weight_version"] == job.weight_version == f"mezo-{job.mezo_job_id}-10"
    server.request("POST", "/mezo/reset", {})


def test_a_job_may_choose_the_weights_it_trains(server, client):
    training = client.files.create(file=("chat.jsonl", jsonl(CHAT)), purpose="fine-tune")
    base = client.models.list().data[0].id
    norm = r"^model\.norm\.weight$"
    job = finished(client, client.fine_tuning.jobs.create(
        model=base, training_file=training.id, hyperparameters={"n_epochs": 1, "batch_size": 3},
        extra_body={"mezo": {"train": [norm]}}).id)
    assert job.status == "succeeded", job.error
    trajectory = server.request("GET", f"/mezo/jobs/{job.mezo_job_id}/trajectory")[1]
    assert trajectory["config"]["selection"] == {"include": [norm], "exclude": [], "last_layers": None}
    served = server.request("GET", "/mezo/weights")[1]["weight_version"]
    nothing = finished(client, client.fine_tuning.jobs.create(
        model=base, training_file=training.id, extra_body={"mezo": {"train": ["^no such tensor$"]}}).id)
    assert nothing.status == "failed" and "matches no trainable tensor" in nothing.error.message
    assert server.request("GET", "/mezo/weights")[1]["weight_version"] == served  # nothing moved
    with pytest.raises(openai.BadRequestError, match="not a regular expression"):
        client.fine_tuning.jobs.create(model=base, training_file=training.id, extra_body={"mezo": {"train": ["("]}})
    server.request("POST", "/mezo/reset", {})


def test_events_stream_as_server_sent_events(server, client):
    training = client.files.create(file=("chat.jsonl", jsonl(CHAT)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file=training.id,
                                         hyperparameters={"n_epochs": 1, "batch_size": 6})
    with httpx.stream("GET", f"{server.url}/v1/fine_tuning/jobs/{job.id}/events", params={"stream": "true"},
                      timeout=120) as response:  # opened while the job validates: it follows the job to its end
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    streamed = [json.loads(d)["id"] for d in data[:-1]]
    assert streamed == [e.id for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data)]
    assert json.loads(data[-2])["message"].startswith("The job has successfully completed")


def test_cancel_and_bad_files(client):
    base = client.models.list().data[0].id
    training = client.files.create(file=("chat.jsonl", jsonl(CHAT)), purpose="fine-tune")
    short = finished(client, client.fine_tuning.jobs.create(model=base, training_file=training.id,
                                                            hyperparameters={"n_epochs": 1, "batch_size": 6}).id)
    assert short.status == "succeeded"
    at_once = client.fine_tuning.jobs.create(model=base, training_file=training.id)
    client.fine_tuning.jobs.cancel(at_once.id)  # while validating or queued: ends now; starting: at its first chunk
    assert finished(client, at_once.id).status == "cancelled"

    long = client.fine_tuning.jobs.create(model=base, training_file=training.id,
                                          hyperparameters={"n_epochs": 500, "batch_size": 1})
    deadline = time.monotonic() + 120
    while (status := client.fine_tuning.jobs.retrieve(long.id).status) != "running":
        assert status in ("validating_files", "queued") and time.monotonic() < deadline, status
        time.sleep(0.1)
    # the weights change under every chunk now: a request naming a fine-tuned model cannot be answered by them
    with pytest.raises(openai.ConflictError, match="trains the served weights"):
        client.completions.create(model=short.fine_tuned_model, prompt="the film", max_tokens=2)
    assert client.fine_tuning.jobs.cancel(long.id).id == long.id
    cancelled = finished(client, long.id)
    assert cancelled.status == "cancelled" and 0 < cancelled.trained_tokens
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(long.id)

    bad = jsonl(CHAT[:1]) + b'{"messages": [{"role": "user", "content": "x", "weight": 1}]}\n'
    bad_file = client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    job = finished(client, client.fine_tuning.jobs.create(model=base, training_file=bad_file.id).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "bad.jsonl: line 2: messages.0: Value error, weight is only for assistant messages" in job.error.message

    prefs = client.files.create(file=("prefs.jsonl", jsonl(PREFERENCES)), purpose="fine-tune")
    job = finished(client, client.fine_tuning.jobs.create(model=base, training_file=training.id,
                                                          validation_file=prefs.id).id)
    assert job.status == "failed" and job.error.param == "validation_file" and "holds preference lines" in \
        job.error.message

    not_json = client.files.create(file=("broken.jsonl", jsonl(CHAT[:2]) + b'{"messages": [\n'), purpose="fine-tune")
    job = finished(client, client.fine_tuning.jobs.create(model=base, training_file=not_json.id).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file" and "line 3" in job.error.message
    job = finished(client, client.fine_tuning.jobs.create(model=base, training_file=training.id,
                                                          method={"type": "dpo"}).id)
    assert job.status == "failed" and job.error.param == "training_file" and "a dpo job takes" in job.error.message
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.files.create(file=("empty.jsonl", b""), purpose="fine-tune")

    not_utf8 = client.files.create(file=("latin.jsonl", '{"prompt": "caf\xe9"}'.encode("latin-1")), purpose="fine-tune")
    job = finished(client, client.fine_tuning.jobs.create(model=base, training_file=not_utf8.id).id)
    assert job.status == "failed" and "not UTF-8" in job.error.message

    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model=base, training_file="file-000000000000000000000000")
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=training.id)
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        client.fine_tuning.jobs.create(model=base, training_file=training.id, hyperparameters={"n_epochs": "many"})
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
