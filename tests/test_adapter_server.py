"""Adapter jobs on a real CPU SGLang server: LoRA adapters trained in SGLang's own pool while the base serves.

Checked over HTTP: two adapter jobs train at once while the base's answers stay those of a server with no job
(same greedy tokens, same log-probs); each adapter is then served by name as its trajectory, replayed onto its
seeded start and written as a PEFT folder, computes in transformers + peft; the probes scored in one batch measure
what one forward per probe measures; and the refusals name the flag a job goes beyond.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import openai
import pytest
import torch
from mezo_checks import hf_logprobs, max_diff, run_job, served_logprobs
from servers import running_server
from tiny_models import save_tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM

from sglang_mezo.core.lora import LoraSpec, ModelDims, initial_weights, replay_adapter, save_peft_adapter
from sglang_mezo.core.trajectory import Trajectory

pytestmark = pytest.mark.server  # starts a real SGLang server

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FLAGS = ("--enable-lora", "--lora-backend", "torch_native", "--max-lora-rank", "8", "--lora-target-modules", *ALL,
         "--max-loras-per-batch", "6", "--mezo-chunk-ms", "50")
EXAMPLES = [{"prompt": "a great story with", "completion": " great music"},
            {"prompt": "a terrible script,", "completion": " boring scenes"},
            {"prompt": "the plot was", "completion": " great"}]
JOB = {"examples": EXAMPLES, "eval_examples": EXAMPLES, "batch_size": 3, "lr": 2e-2, "eps": 1e-2, "n_probes": 2,
       "adaptive": "none"}
GREEDY = {"text": ["a great story", "the plot"], "sampling_params": {"max_new_tokens": 6, "temperature": 0},
          "return_logprob": True}


def greedy(server) -> list[list[int]]:
    status, out = server.request("POST", "/generate", GREEDY)
    assert status == 200, out
    return [o["output_ids"] for o in out]


def peft_logprobs(model_path: str, folder) -> list[list[float]]:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return hf_logprobs(PeftModel.from_pretrained(base, str(folder)).eval())


def exported(server, model_path: str, job_id: str, out) -> str:
    """The job's adapter rebuilt from its trajectory alone (seeded start + recorded updates), as a PEFT folder."""
    status, doc = server.request("GET", f"/mezo/jobs/{job_id}/trajectory")
    assert status == 200, doc
    trajectory = Trajectory.from_dict(doc)
    spec = LoraSpec.from_dict(trajectory.adapter)
    tensors = replay_adapter(ModelDims.of(AutoConfig.from_pretrained(model_path)), spec, trajectory.records,
                             trajectory.z_kind)
    return str(save_peft_adapter(out, tensors, spec.peft_config(model_path)))


def test_adapters_train_beside_an_unchanged_base_and_are_served_as_their_peft_replay(tmp_path):
    model_path = save_tiny_llama(tmp_path / "base", seed=4)
    out = tmp_path / "out"
    out.mkdir()
    served = {}
    with running_server(model_path, *FLAGS, "--mezo-output-dir", str(out), log_dir=tmp_path) as server:
        base_logprobs, base_tokens = served_logprobs(server), greedy(server)
        watched: list[tuple[float, bool]] = []
        done = threading.Event()

        def watch() -> None:  # base traffic throughout both jobs
            while not done.is_set():
                watched.append((max_diff(served_logprobs(server), base_logprobs), greedy(server) == base_tokens))

        watcher = threading.Thread(target=watch)
        watcher.start()
        jobs = {}
        try:
            for name, adapter in (("tenant-a", {"rank": 4}), ("tenant-b", {"rank": 8, "alpha": 8,
                                                                             "target_modules": ["q_proj", "v_proj"]})):
                status, job = server.request("POST", "/mezo/step", {**JOB, "steps": 40, "seed": len(jobs),
                                                                     "adapter": {"name": name, **adapter}})
                assert status == 200, job
                jobs[name] = job["job_id"]
            # both train at once: neither waits in the base's queue
            assert {server.request("GET", f"/mezo/jobs/{j}")[1]["status"] for j in jobs.values()} <= {"running",
                                                                                                      "succeeded"}
            finished = {}
            for name, job_id in jobs.items():
                deadline = time.monotonic() + 300
                while (job := server.request("GET", f"/mezo/jobs/{job_id}")[1])["status"] == "running":
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
                finished[name] = job
        finally:
            done.set()
            watcher.join()
        assert len(watched) >= 3
        assert all(diff < 1e-5 and same for diff, same in watched), watched
        for name, job in finished.items():
            assert job["status"] == "succeeded", job
            first, last = job["evals"][0], job["evals"][-1]
            assert last["loss"] < first["loss"] - 1e-3, (name, first, last)
            assert last["weight_version"] == f"mezo-{jobs[name]}-40"
            served[name] = served_logprobs(server, lora=name)
            assert max_diff(served[name], base_logprobs) > 1e-3  # the adapter does change what it serves
            folder = exported(server, model_path, jobs[name], tmp_path / name)
            assert max_diff(served[name], peft_logprobs(model_path, folder)) < 1e-5, name
            status, saved = server.request("POST", "/mezo/save", {"path": name, "adapter": name})
            assert status == 200 and saved["weight_version"] == last["weight_version"], saved
            assert max_diff(served[name], peft_logprobs(model_path, out / name)) < 1e-5, name
        assert max_diff(served_logprobs(server), base_logprobs) == 0.0
        weights = server.request("GET", "/mezo/weights")[1]
        assert {a["name"]: (a["weight_version"], a["base_changed"]) for a in weights["adapters"]} == {
            name: (f"mezo-{job_id}-40", False) for name, job_id in jobs.items()}
        models = [m["id"] for m in server.request("GET", "/v1/models")[1]["data"]]
        assert {m.rsplit(":", 1)[-1] for m in models[1:]} >= set(jobs), models
        status, body = server.request("POST", "/mezo/save", {"path": "nothing", "adapter": "never-trained"})
        assert status == 404, body
    # the saved folders load in a fresh SGLang as any PEFT adapter, serving what the trained ones served
    with running_server(model_path, *FLAGS, "--lora-paths", *(f"{n}={out / n}" for n in jobs),
                        log_dir=tmp_path) as fresh:
        for name in jobs:
            assert max_diff(served_logprobs(fresh, lora=name), served[name]) < 1e-5, name


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """The shared server's folder: its base model (``base``) and a PEFT adapter it loads at launch (``loaded``)."""
    root = tmp_path_factory.mktemp("adapters")
    model_path = save_tiny_llama(root / "base", seed=4)
    spec = LoraSpec(rank=4, alpha=8, target_modules=ALL)
    generator = torch.Generator().manual_seed(0)
    tensors = {n: 0.05 * torch.randn(t.shape, generator=generator)
               for n, t in initial_weights(ModelDims.of(AutoConfig.from_pretrained(model_path)), spec).items()}
    save_peft_adapter(root / "loaded", tensors, spec.peft_config(model_path))
    (root / "data").mkdir()
    return root


@pytest.fixture(scope="module")
def shared(shared_root):
    """One server for the tests that need nothing of their own (it keeps the suite's server starts few)."""
    root = shared_root
    with running_server(str(root / "base"), *FLAGS, "--mezo-data-dir", str(root / "data"), "--lora-paths",
                        f"loaded={root / 'loaded'}", log_dir=root) as server:
        yield server


def _text_loss(logprobs: list[list[float]]) -> float:
    return -sum(map(sum, logprobs)) / sum(map(len, logprobs))


def test_a_job_that_names_no_knob_gets_the_recipe_and_keeps_an_unrelated_text_s_loss(shared):
    """The server's defaults on a server launched with none of the --mezo-* knobs: a base job trains the final norm,
    an adapter job gets the adapter recipe; neither moves the loss on a text it never saw by more than 0.15 nats (the
    base job) and 0.1 (the adapter)."""
    server = shared
    base = served_logprobs(server)
    job = run_job(server, {"examples": EXAMPLES, "steps": 40, "batch_size": 3})
    assert job["status"] == "succeeded", job
    recipe = job["recipe"]
    assert recipe["recipe"] == "final-norm" and recipe["lr"] == 0.2 and recipe["adaptive"] == "scalar_rms", recipe
    assert (recipe["estimator"], recipe["n_probes"], recipe["schedule"]) == ("fzoo", 8, "cosine"), recipe
    assert set(recipe["sources"].values()) == {"recipe"} and recipe["trained_numbers"] == 32  # the tiny model's
    trajectory = server.request("GET", f"/mezo/jobs/{job['job_id']}/trajectory")[1]
    assert trajectory["trainable_names"] == ["model.norm.weight"]
    # the gain scales every logit of this random tiny model: 40 steps of the second recipe (lr 0.2, 8 probes) on its
    # 32 gains moved the unrelated text's loss by 0.115 nats (2026-12-05; the first recipe, lr 1e-2: under 0.1)
    assert abs(_text_loss(served_logprobs(server)) - _text_loss(base)) <= 0.15
    assert server.request("POST", "/mezo/reset", {})[0] == 200
    assert max_diff(served_logprobs(server), base) == 0.0
    job = run_job(server, {"examples": EXAMPLES, "steps": 100, "batch_size": 3, "adapter": {"name": "no-knobs"}})
    assert job["status"] == "succeeded", job
    recipe = job["recipe"]
    assert (recipe["recipe"], recipe["lr"], recipe["eps"], recipe["adaptive"]) == ("adapter", 1e-3, 1e-2, "scalar_rms")
    assert (recipe["estimator"], recipe["n_probes"], recipe["schedule"]) == ("spsa", 1, "constant"), recipe
    tuned = served_logprobs(server, lora="no-knobs")
    assert max_diff(tuned, base) > 0  # it trained
    assert _text_loss(tuned) - _text_loss(base) <= 0.1, (_text_loss(tuned), _text_loss(base))


def test_a_job_starts_from_a_trained_adapter_or_a_loaded_peft_folder_and_replays_from_its_trajectory(
        shared, shared_root, tmp_path):
    server, model_path = shared, str(shared_root / "base")
    first = run_job(server, {**JOB, "steps": 3, "adapter": {"name": "first", "rank": 4}})
    assert first["status"] == "succeeded", first
    before = {name: served_logprobs(server, lora=name) for name in ("first", "loaded")}
    for name, start in (("continued", "first"), ("from-peft", "loaded")):
        job = run_job(server, {**JOB, "steps": 3, "seed": 1, "adapter": {"name": name, "start_from": start}})
        assert job["status"] == "succeeded", job
        served = served_logprobs(server, lora=name)
        assert max_diff(served, before[start]) > 1e-4  # it trained on
        # its trajectory alone (which names its start) rebuilds what it serves
        folder = exported(server, model_path, job["job_id"], tmp_path / name)
        assert max_diff(served, peft_logprobs(model_path, folder)) < 1e-5, name
        assert max_diff(served_logprobs(server, lora=start), before[start]) == 0.0  # the start is served as it was
    trajectory = Trajectory.from_dict(server.request("GET", f"/mezo/jobs/{job['job_id']}/trajectory")[1])
    assert trajectory.adapter["start"]["peft_path"] == str((shared_root / "loaded").resolve())
    for adapter, words in (({"start_from": "nothing-by-that-name"}, "no adapter named"),
                           ({"start_from": "first", "rank": 8}, "differs"),
                           ({"start_from": "loaded", "target_modules": ["q_proj", "v_proj"]}, "differs")):
        status, body = server.request("POST", "/mezo/step", {**JOB, "steps": 1, "adapter": {"name": "x", **adapter}})
        assert status == 400 and words in str(body), body


def test_probes_in_one_batch_measure_what_one_forward_per_probe_measures(shared):
    server = shared
    jobs = {}
    for together in (True, False):
        job = run_job(server, {**JOB, "steps": 6, "adapter": {"name": f"batched-{together}", "rank": 4,
                                                              "probes_in_one_batch": together}})
        assert job["status"] == "succeeded", job
        jobs[together] = server.request("GET", f"/mezo/jobs/{job['job_id']}/history")[1]["steps"]
    for one, alone in zip(jobs[True], jobs[False], strict=True):
        assert one["loss_plus"] == pytest.approx(alone["loss_plus"], abs=1e-5)
        assert one["loss_minus"] == pytest.approx(alone["loss_minus"], abs=1e-5)


def test_refusals_name_the_launch_flag_and_nothing_starts(shared):
    server = shared

    def refused(adapter: dict, **job) -> tuple[int, str]:
        status, body = server.request("POST", "/mezo/step", {**JOB, **job, "adapter": adapter})
        return status, str(body)

    status, body = refused({"name": "x", "rank": 16})
    assert status == 400 and "--max-lora-rank 8" in body
    status, body = refused({"name": "x", "target_modules": ["lm_head"]})
    assert status == 400 and "target_modules" in body
    status, body = refused({"name": "x", "target_modules": ["q_proj"]})
    assert status == 400 and "v_proj" in body
    status, body = refused({"name": "x"}, n_probes=3)  # 6 probe adapters + one slot kept > 6
    assert status == 400 and "--max-loras-per-batch 6" in body
    status, body = refused({"name": "a:b"})
    assert status == 400
    status, job = server.request("POST", "/mezo/step", {**JOB, "steps": 400, "adapter": {"name": "busy"}})
    assert status == 200, job
    status, body = refused({"name": "busy"})
    assert status == 409 and "busy" in body
    status, body = server.request("POST", "/mezo/step", {**JOB, "steps": 1})  # a base job under an adapter
    assert status == 409, body
    assert server.request("POST", f"/mezo/jobs/{job['job_id']}/cancel")[0] == 200
    assert server.request("GET", "/mezo/jobs")[1]["jobs"][-1]["status"] in ("running", "cancelled")


def test_a_server_killed_mid_job_serves_each_adapter_at_its_last_committed_step_again(tmp_path):
    model_path = save_tiny_llama(tmp_path / "base", seed=4)
    state = ["--mezo-state-dir", str(tmp_path / "state"), "--mezo-output-dir", str(tmp_path)]
    with running_server(model_path, *FLAGS, *state, log_dir=tmp_path) as server:
        base = served_logprobs(server)
        done = run_job(server, {**JOB, "steps": 5, "adapter": {"name": "finished", "rank": 4}})
        assert done["status"] == "succeeded", done
        finished_logprobs = served_logprobs(server, lora="finished")
        status, job = server.request("POST", "/mezo/step", {**JOB, "steps": 400, "seed": 1,
                                                            "adapter": {"name": "killed", "rank": 8}})
        assert status == 200, job
        deadline = time.monotonic() + 120
        while (seen := server.request("GET", f"/mezo/jobs/{job['job_id']}")[1]["step"]) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    with running_server(model_path, *FLAGS, *state, log_dir=tmp_path) as server:
        jobs = {j["job_id"]: j for j in server.request("GET", "/mezo/jobs")[1]["jobs"]}
        killed = jobs[job["job_id"]]
        assert killed["status"] == "failed" and killed["error_kind"] == "interrupted" and killed["step"] >= seen
        assert max_diff(served_logprobs(server), base) == 0.0  # the base never carried an adapter's steps
        assert max_diff(served_logprobs(server, lora="finished"), finished_logprobs) < 1e-6
        replayed = exported(server, model_path, job["job_id"], tmp_path / "killed-replay")
        assert max_diff(served_logprobs(server, lora="killed"), peft_logprobs(model_path, replayed)) < 1e-5
        status, saved = server.request("POST", "/mezo/save", {"path": "killed", "adapter": "killed"})
        assert status == 200 and saved["weight_version"] == f"mezo-{job['job_id']}-{killed['step']}", saved
        again = run_job(server, {**JOB, "steps": 2, "adapter": {"name": "killed", "rank": 8}})
        assert again["status"] == "succeeded", again  # the name trains again, from a fresh start


def test_a_failed_step_or_a_torn_commit_leaves_the_adapter_served_at_a_committed_version(tmp_path):
    model_path = save_tiny_llama(tmp_path / "base", seed=4)
    faults = {"SGLANG_MEZO_INJECT_FAULT": "raise@7/3:1,torn@8/4:1"}
    with running_server(model_path, *FLAGS, "--mezo-chunk-ms", "0", log_dir=tmp_path, env=faults) as server:
        base = served_logprobs(server)
        for name, seed, kind, steps in (("raised", 7, "step_failed", 3), ("torn", 8, "weights_inconsistent", 4)):
            job = run_job(server, {**JOB, "steps": 10, "seed": seed, "adapter": {"name": name, "rank": 4}})
            assert job["status"] == "failed" and job["error_kind"] == kind and job["step"] == steps, job
            assert not job["weights_inconsistent"], job  # the base was never touched
            replayed = exported(server, model_path, job["job_id"], tmp_path / name)
            assert max_diff(served_logprobs(server, lora=name), peft_logprobs(model_path, replayed)) < 1e-5, name
        assert max_diff(served_logprobs(server), base) == 0.0
        again = run_job(server, {**JOB, "steps": 2, "seed": 8, "adapter": {"name": "torn", "rank": 4}})
        assert again["status"] == "succeeded", again


def test_an_openai_fine_tune_with_an_adapter_is_served_as_that_adapter_beside_the_base(shared):
    chats = [{"messages": [{"role": "user", "content": f"the film {w}"},
                           {"role": "assistant", "content": "great" if good else "bad"}]}
             for w, good in [("was great", True), ("was bad", False), ("was fun", True), ("was dull", False)]]
    server = shared
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    base = client.models.list().data[0].id

    def answer(model: str) -> list[float]:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "the film"}],
                                               max_tokens=4, temperature=0, logprobs=True)
        return [t.logprob for t in reply.choices[0].logprobs.content]

    before = answer(base)
    upload = client.files.create(file=("chat.jsonl", "".join(json.dumps(c) + "\n" for c in chats).encode()),
                                 purpose="fine-tune")
    created = client.fine_tuning.jobs.create(
        model=base, training_file=upload.id,
        # the adapter recipe (scalar_rms, lr 1e-3, ε 1e-2), its lr scaled by OpenAI's multiplier
        hyperparameters={"n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 10},
        extra_body={"mezo": {"n_probes": 2, "adapter": {"rank": 4}}})
    deadline = time.monotonic() + 300
    while (job := client.fine_tuning.jobs.retrieve(created.id)).status not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert job.status == "succeeded", job
    listed = [m.id for m in client.models.list().data]
    tail = job.fine_tuned_model.removeprefix("ft:")
    assert listed.count(job.fine_tuned_model) == 1 and f"{base}:{tail}" not in listed, listed  # listed once
    tuned = answer(job.fine_tuned_model)
    assert answer(base) == before  # the base is served as it was
    assert max(abs(a - b) for a, b in zip(tuned, before)) > 1e-4  # the adapter serves its own answer
    # fine-tuning the fine-tuned model continues its adapter: a new adapter that starts from it
    continued = client.fine_tuning.jobs.create(
        model=job.fine_tuned_model, training_file=upload.id,
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10},
        extra_body={"mezo": {"n_probes": 2}})
    while (continued := client.fine_tuning.jobs.retrieve(continued.id)).status not in ("succeeded", "failed"):
        assert time.monotonic() < deadline + 300
        time.sleep(0.3)
    assert continued.status == "succeeded", continued
    assert max(abs(a - b) for a, b in zip(answer(continued.fine_tuned_model), tuned)) > 1e-5
    assert answer(job.fine_tuned_model) == tuned  # the adapter it started from serves as before
    with pytest.raises(openai.BadRequestError, match="start_from"):
        client.fine_tuning.jobs.create(model=job.fine_tuned_model, training_file=upload.id,
                                       extra_body={"mezo": {"adapter": {"start_from": "loaded"}}})
