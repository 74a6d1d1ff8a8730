"""The plugin inside a real SGLang server on CPU: stock behaviour without --enable-mezo, flags validated at launch."""

from __future__ import annotations

import subprocess

import pytest
import torch
from mezo_checks import run_job
from servers import PAPER_STEP, running_server
from tiny_models import save_tiny_llama

from sglang_mezo.launch import server_command

pytestmark = pytest.mark.server  # starts real SGLang servers


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


MEZO_ROUTES = [("POST", "/mezo/step"), ("GET", "/mezo/jobs"), ("GET", "/mezo/jobs/x"), ("POST", "/mezo/jobs/x/cancel"),
               ("GET", "/mezo/jobs/x/trajectory"), ("POST", "/mezo/eval"), ("GET", "/mezo/weights"),
               ("POST", "/mezo/reset"), ("POST", "/mezo/save")]


def test_without_enable_mezo_the_server_is_stock(tiny_model_path, tmp_path):
    with running_server(tiny_model_path, enable_mezo=False, log_dir=tmp_path) as server:
        status, out = server.request("POST", "/generate", {
            "input_ids": [[80, 82, 89, 76], [87, 75, 72]],
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": 1,
        })
        assert status == 200
        assert [len(o["meta_info"]["input_token_logprobs"]) for o in out] == [3, 2]
        for method, path in MEZO_ROUTES:
            assert server.request(method, path, {} if method == "POST" else None)[0] == 404, path
        assert "MeZO enabled" not in server.log.read_text()


def test_enable_mezo_options_reach_the_server(tiny_model_path, tmp_path):
    # on every interface and with no key: the launch says who can train it
    with running_server(tiny_model_path, *PAPER_STEP, "--mezo-last-layers", "1", "--mezo-z-kind", "gaussian", "--enable-metrics",
                        "--host", "0.0.0.0", log_dir=tmp_path) as server:
        log = server.log.read_text()
        assert "MeZO enabled" in log and "last_layers=1" in log and "z_kind='gaussian'" in log
        assert "anyone who can reach this port can train" in log
        status, out = server.request("POST", "/generate", {"text": "the movie", "sampling_params": {"max_new_tokens": 2}})
        assert status == 200 and len(out["output_ids"]) == 2
        # every MeZO route exists here (so the 404s of the stock server above mean something)
        for method, path in MEZO_ROUTES:
            assert server.request(method, path, {} if method == "POST" else None)[0] != 404 or "/x" in path, path
        # with --enable-metrics, MeZO's metrics are on SGLang's Prometheus endpoint
        examples = [{"prompt": "the movie was", "options": [" bad", " good"], "label": 1}]
        job = run_job(server, {"examples": examples, "eval_examples": examples, "steps": 3, "lr": 1e-3})
        assert job["status"] == "succeeded", job
        status, text = server.request("GET", "/metrics")
        assert status == 200
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("sglang_mezo_")}
        assert values["sglang_mezo_steps_total"] == 3 and values["sglang_mezo_probes_total"] == 3
        assert values["sglang_mezo_zero_grad_probes_total"] == job["zero_grad_rate"] * 3
        assert values["sglang_mezo_step_seconds_count"] == 3 and values["sglang_mezo_jobs_total"] == 1
        assert values["sglang_mezo_eval_accuracy"] == job["evals"][-1]["accuracy"]


@pytest.mark.parametrize("flag, value, message", [
    ("--mezo-eps", "-1", "--mezo-eps must be"),
    ("--mezo-lr", "nan", "--mezo-lr must be"),
    ("--mezo-n-probes", "0", "must be >= 1"),
])
def test_bad_mezo_flags_stop_the_launch(tiny_model_path, flag, value, message):
    cmd, env = server_command(["--model-path", tiny_model_path, flag, value], cuda=torch.cuda.is_available())
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert message in out.stderr
