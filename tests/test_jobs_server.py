"""Training jobs as a user runs them, on a real SGLang server on CPU over HTTP: evaluation (on demand and inside a
job), best-evaluation tracking with an exact reset to it, and the objectives' telemetry (an accuracy job's
zero-gradient rate)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mezo_checks import (assert_served_is_replay, assert_step_scores_per_option, choice_batch, engine_for_served,
                         run_job)
from servers import PAPER_STEP, running_server
from tiny_models import save_tiny_llama
from transformers import AutoTokenizer

from sglang_mezo.core.objectives import (EvalMetrics, Objective, evaluate, generation_metrics,
                                         scoring_items, token_f1)

pytestmark = pytest.mark.server  # starts real SGLang servers

OPTIONS = [" terrible", " great"]
REVIEWS = [("a great story with great music", 1), ("the film was terrible", 0), ("great acting, a great cast", 1),
           ("terrible script, boring scenes", 0), ("the movie was great", 1), ("a terrible, boring film", 0)]
HELD_OUT = [("great music and a great story", 1), ("boring and terrible", 0), ("the cast was great", 1),
            ("the scenes were terrible", 0)]


def choice(reviews) -> list[dict]:
    return [{"prompt": f"{text}. It was", "options": OPTIONS, "label": label} for text, label in reviews]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=11)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The server's data folder (data/) and output folder (out/)."""
    root = tmp_path_factory.mktemp("files")
    (root / "data").mkdir()
    (root / "out").mkdir()
    return root


@pytest.fixture(scope="module")
def server(model_path, files, tmp_path_factory):
    with running_server(model_path, *PAPER_STEP, "--mezo-z-kind", "gaussian", "--mezo-data-dir", str(files / "data"),
                        "--mezo-output-dir", str(files / "out"), log_dir=tmp_path_factory.mktemp("logs")) as srv:
        yield srv


def reference_eval(server, model_path: str, examples: list[dict], objective: Objective):
    """The metrics the reference engine gives on the weights the server says it serves."""
    batch = choice_batch(model_path, examples)
    engine = engine_for_served(server, model_path)
    return evaluate(objective, batch, engine.score(scoring_items(batch)))


def test_eval_matches_the_reference_engine(server, model_path):
    status, out = server.request("POST", "/mezo/eval", {"examples": choice(HELD_OUT)})
    assert status == 200, out
    expected = reference_eval(server, model_path, choice(HELD_OUT), Objective.CLASSIFICATION)
    assert out["n"] == 4 and abs(out["loss"] - expected.loss) <= 1e-4 and out["accuracy"] == expected.accuracy
    assert out["weight_version"] == server.request("GET", "/mezo/weights")[1]["weight_version"]
    assert server.request("POST", "/mezo/eval", {"examples": []})[0] == 400
    assert server.request("POST", "/mezo/eval", {"examples": choice(HELD_OUT), "objective": "cross_entropy"})[0] == 400


def test_one_token_options_share_their_prompt_in_evaluation_and_in_steps(server, model_path):
    """Options of one token each ("n"/"y" are single tokens of the test tokenizer) are read at the last prompt
    position of one sequence, in /mezo/eval (SGLang's request path) and inside a step (the scheduler's own scoring
    batch). Evaluation equals the per-option path through the same server (each option scored as its own completion)
    to 1e-5; a step's L+ and L- equal the reference engine's per-option path under the same probe to 1e-4 (SGLang
    against transformers, as elsewhere)."""
    import torch

    from sglang_mezo.core.objectives import shares_prompt

    examples = [{"prompt": f"{text}. Good? ", "options": ["n", "y"], "label": label} for text, label in REVIEWS]
    assert all(shares_prompt(example) for example in choice_batch(model_path, examples))

    status, shared = server.request("POST", "/mezo/eval", {"examples": examples})
    assert status == 200, shared
    logits = []
    for e in examples:  # the per-option path: every option its own completion, through the same server
        row = []
        for option in e["options"]:
            body = {"examples": [{"prompt": e["prompt"], "completion": option}], "objective": "cross_entropy"}
            status, out = server.request("POST", "/mezo/eval", body)
            assert status == 200, out
            row.append(-out["loss"])
        logits.append(torch.tensor(row, dtype=torch.float64))
    losses = [-torch.log_softmax(row, 0)[e["label"]].item() for row, e in zip(logits, examples)]
    assert abs(shared["loss"] - sum(losses) / len(losses)) <= 1e-5
    hits = [int(row.argmax()) == e["label"] for row, e in zip(logits, examples)]
    assert shared["accuracy"] == sum(hits) / len(hits)

    assert_step_scores_per_option(server, model_path, examples, eps=1e-2, n_probes=2, seed=4)


SCALED = {"tensor_scale": "pretrained_rms", "train": [r"^model\.norm\.", r"layers\.1\."], "z_rank": 2}


@pytest.mark.parametrize("estimator, adaptive, extra", [("spsa", "scalar_rms", {}), ("fzoo", "none", {}),
                                                        ("fzoo", "scalar_rms", {}), ("greedy", "none", SCALED)])
def test_each_estimator_trains_through_the_api_and_replays_bit_for_bit(server, model_path, estimator, adaptive,
                                                                       extra):
    """Each method, chosen per job, runs a few steps through the HTTP API in chunks of one step (so the step-size
    rule's state crosses chunks); its trajectory names the method, and the served weights are bit for bit the
    reference engine's replay of the served history. The last job also names its own trainable set, scales its
    tensors by their RMS in the checkpoint and moves its matrices along rank-2 z: the trajectory holds the scales
    and the rank (stream version 2), and replay needs nothing else."""
    job = run_job(server, {"examples": choice(REVIEWS), "steps": 3, "batch_size": 4, "lr": 1e-3, "eps": 1e-3,
                           "n_probes": 2, "estimator": estimator, "adaptive": adaptive, "seed": 5, **extra})
    assert job["status"] == "succeeded" and job["step"] == 3, job
    trajectory = server.request("GET", f"/mezo/jobs/{job['job_id']}/trajectory")[1]
    assert trajectory["config"]["estimator"] == estimator and trajectory["config"]["adaptive"] == adaptive
    if extra:
        scales = dict(trajectory["config"]["tensor_scales"])
        assert set(scales) == set(trajectory["trainable_names"]) and "model.norm.weight" in scales
        assert len(set(scales.values())) > 1 and job["recipe"]["sources"]["selection"] == "job"
        assert trajectory["format_version"] == 4 and trajectory["generator_version"] == 2
    assert_served_is_replay(server, model_path)
    status, out = server.request("POST", "/mezo/step", {"examples": choice(REVIEWS), "estimator": "fzoo",
                                                        "n_probes": 1})
    assert status == 400 and "n_probes" in out["message"], out


def test_a_job_evaluates_periodically_and_its_best_step_can_be_restored(server, model_path):
    job = run_job(server, {"examples": choice(REVIEWS), "eval_examples": choice(HELD_OUT), "eval_every": 4,
                           "steps": 10, "lr": 5e-2, "eps": 1e-2, "batch_size": 4, "seed": 5})
    assert job["status"] == "succeeded", job
    evals = job["evals"]
    assert [e["step"] for e in evals] == [0, 4, 8, 10]
    assert evals[0]["weight_version"] != evals[-1]["weight_version"]
    assert len({round(e["loss"], 9) for e in evals}) > 1  # the weights moved between evaluations
    # the last evaluation is of the served weights, as /mezo/eval and the reference engine see them
    now = server.request("POST", "/mezo/eval", {"examples": choice(HELD_OUT)})[1]
    # (1e-6, not equality: the prefix cache may now supply the prompts' KV, computed in another batch shape)
    assert abs(now["loss"] - evals[-1]["loss"]) <= 1e-6 and now["weight_version"] == evals[-1]["weight_version"]
    expected = reference_eval(server, model_path, choice(HELD_OUT), Objective.CLASSIFICATION)
    assert abs(now["loss"] - expected.loss) <= 1e-4
    # the curves: as data, and as a PNG
    history = server.request("GET", f"/mezo/jobs/{job['job_id']}/history")[1]
    assert [s["step"] for s in history["steps"]] == list(range(10)) and history["evals"] == evals
    assert history["steps"][-1] == job["last"]
    with urllib.request.urlopen(f"{server.url}/mezo/jobs/{job['job_id']}/plot", timeout=60) as response:
        assert response.headers["Content-Type"] == "image/png"
        png = response.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    # best: highest accuracy, then lowest loss, then earliest; a reset to its step gives exactly its numbers back
    best = job["best_eval"]
    assert best == max(evals, key=lambda e: (e["accuracy"], -e["loss"], -e["step"]))
    status, weights = server.request("POST", "/mezo/reset", {"job_id": job["job_id"], "step": best["step"]})
    assert status == 200, weights
    again = server.request("POST", "/mezo/eval", {"examples": choice(HELD_OUT)})[1]
    assert abs(again["loss"] - best["loss"]) <= 1e-6
    assert (again["accuracy"], again["weight_version"]) == (best["accuracy"], best["weight_version"])


def test_an_accuracy_job_reports_its_zero_gradient_rate(server):
    """Accuracy is piecewise constant: with a small ε almost no probe flips a prediction, so L+ = L- and g = 0.
    The job says how often, instead of silently not training."""
    job = run_job(server, {"examples": choice(REVIEWS), "objective": "accuracy", "steps": 12, "lr": 1e-2,
                           "eps": 1e-4, "batch_size": 6, "seed": 8})
    assert job["status"] == "succeeded", job
    trajectory = server.request("GET", f"/mezo/jobs/{job['job_id']}/trajectory")[1]
    grads = [g for step in trajectory["steps"]["projected_grads"] for g in step]
    zero = sum(1 for g in grads if g == 0.0)
    assert zero >= len(grads) // 2, grads  # most probes: no signal
    assert job["zero_grad_rate"] == zero / len(grads)
    assert job["zero_grad_steps"] == zero  # one probe per step
    assert job["abs_grad_quantiles"]["min"] == 0.0 and job["abs_grad_quantiles"]["max"] == max(map(abs, grads))


def test_a_job_from_a_data_file_on_the_server(server, files):
    data = files / "data" / "reviews.jsonl"
    data.write_text("".join(json.dumps({"review": text, "stars": "high" if label else "low"}) + "\n"
                            for text, label in REVIEWS + HELD_OUT))
    dataset = {"path": "reviews.jsonl", "eval_size": 2, "seed": 1,
               "template": {"kind": "classification", "prompt": "{review}. It was", "label_field": "stars",
                            "labels": ["low", "high"]}}
    job = run_job(server, {"dataset": dataset, "steps": 4, "eval_every": 2, "lr": 1e-2, "batch_size": 4})
    assert job["status"] == "succeeded", job
    # each knob from the job, else the server's flags (PAPER_STEP), else the recipe
    assert job["recipe"]["sources"] == {"lr": "job", "eps": "recipe", "n_probes": "recipe", "estimator": "flag",
                                        "adaptive": "flag", "selection": "flag", "schedule": "recipe"}, job["recipe"]
    assert (job["recipe"]["n_probes"], job["recipe"]["schedule"]) == (1, "constant")  # spsa's measured step
    assert (job["recipe"]["lr"], job["recipe"]["eps"], job["recipe"]["adaptive"]) == (1e-2, 1e-3, "none")
    assert [(e["step"], e["n"]) for e in job["evals"]] == [(0, 4), (2, 4), (4, 4)]  # 2 held out per class
    status, out = server.request("POST", "/mezo/eval", {"dataset": dataset})
    assert status == 200 and out["n"] == 4 and out["weight_version"] == job["evals"][-1]["weight_version"], out
    assert abs(out["loss"] - job["evals"][-1]["loss"]) <= 1e-6
    # the data's problems are the client's: a 400 that says what is wrong
    for bad, words in [({**dataset, "path": "nope.jsonl"}, "no such file"),
                       ({**dataset, "template": {**dataset["template"], "prompt": "{text}"}}, "needs field"),
                       ({**dataset, "eval_size": 50}, "examples"),
                       ({**dataset, "template": {**dataset["template"], "prompt": "{review.upper}"}}, "only plain")]:
        status, out = server.request("POST", "/mezo/step", {"dataset": bad, "steps": 1})
        assert status == 400 and words in out["message"], (bad, out)
    assert server.request("POST", "/mezo/step", {"dataset": dataset, "examples": choice(REVIEWS)})[0] == 400


def test_data_files_only_inside_the_data_folder_and_no_message_quotes_one(server, files):
    """The /etc/shadow probe: a file outside the data folder is refused whichever way it is named, and a file
    inside it that does not fit the template gets a message with its name and line, never its content."""
    secret = "hunter2"
    (files / "secret.csv").write_text(f"root:{secret}:0:0\nuser:{secret}:1:1\n")
    (files / "data" / "escape.csv").symlink_to(files / "secret.csv")
    template = {"kind": "generation", "prompt": "{a}", "completion": " {b}"}
    for path in [str(files / "secret.csv"), "../secret.csv", "escape.csv", "/etc/shadow", "/etc/passwd"]:
        for route in ("/mezo/eval", "/mezo/step"):
            status, out = server.request("POST", route, {"dataset": {"path": path, "format": "csv",
                                                                     "template": template}})
            assert status == 403 and "--mezo-data-dir" in out["message"] and secret not in str(out), (path, out)
    (files / "data" / "inside.csv").write_text(f"root:{secret}:0:0\n1:2\n")
    status, out = server.request("POST", "/mezo/eval", {"dataset": {"path": "inside.csv", "template": template}})
    assert status == 400 and "inside.csv, line 2" in out["message"] and secret not in str(out), out


def test_the_train_command_follows_a_job_and_keeps_its_best_weights(server, files, tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"examples": choice(REVIEWS), "eval_examples": choice(HELD_OUT), "eval_every": 3,
                                    "lr": 5e-2, "eps": 1e-2, "batch_size": 4}))
    out = subprocess.run([sys.executable, "-m", "sglang_mezo.cli", "train", str(job_file), "--url", server.url,
                          "--steps", "6", "--seed", "9", "--reset-to-best", "--trajectory", str(tmp_path / "t.json"),
                          "--save", "best", "--quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    job = server.request("GET", "/mezo/jobs")[1]["jobs"][-1]
    assert job["status"] == "succeeded" and job["total_steps"] == 6
    best = job["best_eval"]
    assert f"| {best['step']} (best) |" in out.stdout and "zero-gradient probes" in out.stdout, out.stdout
    # --reset-to-best then --save: the saved weights are the best step's
    assert server.request("GET", "/mezo/weights")[1]["weight_version"] == best["weight_version"]
    provenance = json.loads((files / "out" / "best" / "mezo_history.json").read_text())
    assert provenance["weight_version"] == best["weight_version"]
    assert json.loads((tmp_path / "t.json").read_text())["steps"]["step"] == list(range(6))
    # a job the server refuses: a clear message and a non-zero exit
    job_file.write_text(json.dumps({"examples": []}))
    out = subprocess.run([sys.executable, "-m", "sglang_mezo.cli", "train", str(job_file), "--url", server.url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "HTTP 400" in out.stderr, out.stderr


def test_progress_streams_as_server_sent_events(server):
    status, job = server.request("POST", "/mezo/step", {"examples": choice(REVIEWS), "eval_examples": choice(HELD_OUT),
                                                        "eval_every": 5, "steps": 10, "lr": 1e-2, "seed": 13})
    assert status == 200
    events: list[tuple[str, dict]] = []
    with urllib.request.urlopen(f"{server.url}/mezo/jobs/{job['job_id']}/events", timeout=120) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        name = None
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    assert len(events) >= 2 and [n for n, _ in events[:-1]] == ["status"] * (len(events) - 1)
    name, last = events[-1]
    assert name == "end" and last["status"] == "succeeded" and last["step"] == 10 and len(last["evals"]) == 3
    steps = [e["step"] for _, e in events]
    assert steps == sorted(steps)
    assert server.request("GET", "/mezo/jobs/nope/events")[0] == 404


def test_the_eps_diagnostic_shows_why_accuracy_gives_no_signal(server, model_path):
    """For the same batch: the classification loss moves with every probe at any ε, while accuracy (piecewise
    constant) stays flat at small ε. The probes change nothing (lr = 0): the served scores stay the same."""
    # from the base: earlier tests trained with large learning rates, and on their large weights the fp32 rounding
    # of 24 probe round trips alone moved the loss by 2.5e-5 (seen 2026-11-30, with the code before and after the
    # typed-records restructure alike)
    assert server.request("POST", "/mezo/reset", {})[0] == 200
    before = server.request("POST", "/mezo/eval", {"examples": choice(HELD_OUT)})[1]
    body = {"examples": choice(REVIEWS), "eps": [1e-4, 1e-2], "probes": 6, "seed": 2}
    status, smooth = server.request("POST", "/mezo/diagnose", body)
    assert status == 200, smooth
    assert [r["eps"] for r in smooth["results"]] == [1e-4, 1e-2] and smooth["objective"] == "classification"
    assert all(r["nonzero_rate"] == 1.0 for r in smooth["results"])
    small, large = smooth["results"]
    assert large["median_abs_loss_diff"] > 10 * small["median_abs_loss_diff"] > 0  # ~linear in ε
    status, flat = server.request("POST", "/mezo/diagnose", {**body, "objective": "accuracy"})
    assert status == 200, flat
    assert flat["results"][0]["nonzero_rate"] <= 0.5
    after = server.request("POST", "/mezo/eval", {"examples": choice(HELD_OUT)})[1]
    assert abs(after["loss"] - before["loss"]) <= 1e-5
    assert server.request("POST", "/mezo/diagnose", {**body, "eps": [0.5]})[0] == 400


def test_generation_is_evaluated_by_exact_match_and_f1(server, model_path):
    """The served model's own greedy continuation, used as the reference, must score EM = F1 = 1; an unrelated
    reference 0; and the numbers must be those of SGLang's /generate with the same length limits."""
    tok = AutoTokenizer.from_pretrained(model_path)
    prompt = "the film was"
    status, out = server.request("POST", "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 6,
                                                                                           "temperature": 0}})
    assert status == 200
    own = out["text"]
    examples = [{"prompt": prompt, "completion": own}, {"prompt": prompt, "completion": " zebra quartz"}]
    predictions = []
    for e in examples:
        n = len(tok(e["completion"], add_special_tokens=False)["input_ids"])
        predictions.append(server.request("POST", "/generate", {
            "text": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0}})[1]["text"])
    status, metrics = server.request("POST", "/mezo/eval", {"examples": examples, "generate": True})
    assert status == 200, metrics
    expected = generation_metrics(EvalMetrics(n=2, loss=0.0), predictions, [e["completion"] for e in examples])
    assert metrics["exact_match"] == expected.exact_match and metrics["f1"] == pytest.approx(expected.f1)
    assert token_f1(predictions[1], examples[1]["completion"]) == 0.0
    assert metrics["f1"] >= 0.5 * (1 + 0) * token_f1(predictions[0], own) > 0
    assert server.request("POST", "/mezo/eval", {"examples": examples})[1]["f1"] is None  # only when asked


def test_multiple_choice_and_generation_jobs_from_files(server, files):
    import datasets

    questions = [{"q": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "answer": 0}
                 for a in range(1, 5) for b in range(1, 4)]
    datasets.Dataset.from_list(questions).to_parquet(str(files / "data" / "mc.parquet"))
    job = run_job(server, {"dataset": {"path": "mc.parquet", "eval_size": 4,
                                       "template": {"kind": "multiple_choice", "prompt": "{q}", "choices_field":
                                                    "choices", "label_field": "answer"}},
                           "steps": 2, "lr": 1e-2, "batch_size": 4})
    assert job["status"] == "succeeded" and [e["n"] for e in job["evals"]] == [4, 4], job  # answer 0 only
    pairs = [{"src": f"the movie number {i}", "tgt": f"great film {i}"} for i in range(8)]
    (files / "data" / "gen.json").write_text(json.dumps(pairs))
    job = run_job(server, {"dataset": {"path": "gen.json", "eval_size": 3,
                                       "template": {"kind": "generation", "prompt": "{src} was", "completion": " {tgt}"}},
                           "steps": 2, "eval_generate": True, "lr": 1e-2, "batch_size": 4})
    assert job["status"] == "succeeded", job
    assert all(e["f1"] is not None and e["exact_match"] is not None and e["n"] == 3 for e in job["evals"])
    assert job["best_eval"] == max(job["evals"], key=lambda e: (e["f1"], -e["loss"], -e["step"]))
