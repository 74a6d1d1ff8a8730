"""Keys on a real SGLang server on CPU: with --api-key and --admin-api-key, the /mezo routes (and OpenAI's files
and fine-tuning routes) that train, evaluate, reset, save, upload, or read jobs, events and files answer as SGLang's
own admin routes do (ADMIN_OPTIONAL), the served weights' version and the model list as its ordinary routes do
(NORMAL); the client and the train command send the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from servers import running_server
from tiny_models import save_tiny_llama

from sglang_mezo.client import MezoClient, MezoError

pytestmark = pytest.mark.server  # starts real SGLang servers

EXAMPLES = [{"prompt": "the movie was", "completion": " great"}, {"prompt": "the film was", "completion": " bad"}]
TOKENS = (None, "api-key", "admin-key", "wrong")


def status(server, method: str, path: str, token: str | None, body: dict | None = None) -> int:
    """The status of one request that carries ``token`` (or none)."""
    return MezoClient(server.url, api_key=token or "", admin_api_key="", timeout_s=60).request(method, path,
                                                                                            body).status


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=2)


@pytest.mark.parametrize("keys", [("api-key", "admin-key"), ("api-key", None), (None, "admin-key")],
                         ids=["both keys", "api key only", "admin key only"])
def test_mezo_routes_answer_as_sglangs_own_routes_of_their_level(model_path, tmp_path, keys):
    api_key, admin_key = keys
    args = (["--api-key", api_key] if api_key else []) + (["--admin-api-key", admin_key] if admin_key else [])
    with running_server(model_path, *args, log_dir=tmp_path) as server:
        for token in TOKENS:
            # SGLang's own: /flush_cache is ADMIN_OPTIONAL, /get_model_info NORMAL (both harmless to call)
            sglang_admin = status(server, "POST", "/flush_cache", token)
            sglang_normal = status(server, "GET", "/model_info", token)
            for method, path, body in [("POST", "/mezo/reset", {"job_id": "nope"}), ("POST", "/mezo/eval", {}),
                                       ("POST", "/mezo/step", {}), ("POST", "/mezo/save", {}),
                                       ("POST", "/mezo/diagnose", {}), ("POST", "/mezo/jobs/nope/cancel", None),
                                       ("GET", "/mezo/jobs/nope/trajectory", None), ("POST", "/v1/files", {}),
                                       ("DELETE", "/v1/files/nope", None), ("GET", "/v1/files/nope/content", None),
                                       ("POST", "/v1/fine_tuning/jobs", {}),
                                       ("POST", "/v1/fine_tuning/jobs/nope/cancel", None),
                                       ("GET", "/mezo/jobs", None), ("GET", "/mezo/jobs/nope", None),
                                       ("GET", "/mezo/jobs/nope/events", None), ("GET", "/v1/files", None),
                                       ("GET", "/v1/fine_tuning/jobs", None),
                                       ("GET", "/v1/fine_tuning/jobs/nope/events", None)]:
                ours = status(server, method, path, token, body)
                assert (ours in (401, 403)) == (sglang_admin in (401, 403)), (token, path, ours, sglang_admin)
                if ours in (401, 403):
                    assert ours == sglang_admin, (token, path)
            for path in ("/mezo/weights", "/v1/models"):
                ours = status(server, "GET", path, token)
                assert (ours in (401, 403)) == (sglang_normal in (401, 403)), (token, path, ours, sglang_normal)
            # a chat request naming a fine-tuned model: SGLang's key check comes first (it is the outer middleware),
            # so a caller without the key learns nothing of this server's model names
            named = status(server, "POST", "/v1/chat/completions", token, {
                "model": "ft:nope:x:ftjob-0", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
            assert named == (sglang_normal if sglang_normal in (401, 403) else 404), (token, named)

        # the client sends each route the key SGLang checks there: it trains and follows the job with both keys
        client = MezoClient(server.url, api_key=api_key or "", admin_api_key=admin_key or "")
        job = client.train({"examples": EXAMPLES, "steps": 2}, progress=False)
        assert job["status"] == "succeeded", job
        with pytest.raises(MezoError) as refused:
            MezoClient(server.url, api_key="wrong", admin_api_key="").reset()
        assert refused.value.status == 401
        job_file = tmp_path / "job.json"
        job_file.write_text('{"examples": [{"prompt": "the movie was", "completion": " great"}], "steps": 1}')
        command = [sys.executable, "-m", "sglang_mezo.cli", "train", str(job_file), "--url", server.url, "--quiet"]
        keys = {name: key for name, key in (("SGLANG_API_KEY", api_key), ("SGLANG_ADMIN_API_KEY", admin_key)) if key}
        assert subprocess.run(command, capture_output=True, timeout=120, env={"PATH": "", **keys}).returncode == 0
        out = subprocess.run([*command, "--api-key", "wrong", "--admin-api-key", "wrong"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode != 0 and "HTTP 401" in out.stderr, out.stderr
