"""The main job, end to end on a CPU: `make demo`.

1. start `sglang-mezo serve` (SGLang on CPU, embedded SmolLM2-135M-Instruct, --enable-mezo) with no MeZO knob;
2. submit a MeZO job over HTTP (POST /mezo/step, classification objective, MeZO's prompt "<review> It was" ->
   " great" / " terrible") that names no hyper-parameter either: the server's recipe chooses what trains (the final
   RMSNorm's gain) and the step (FZOO with 8 probes, scalar_rms, lr 0.2 decaying to 0 on a cosine, ε 1e-3; README,
   "Defaults"), and the job's status says so.
   A balanced held-out set of Rotten Tomatoes reviews is evaluated by the server (accuracy and loss) before the
   first step, midway and after the last; the job is followed with a progress bar;
3. print the before/after table;
4. send one /v1/chat/completions request, served by the fine-tuned weights;
5. stop the server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from sglang_mezo.client import MezoClient, format_job
from sglang_mezo.default_model import default_model_path
from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes

TEMPLATE = "{text} It was"
OPTIONS = [" terrible", " great"]  # label 0 = rotten, 1 = fresh


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sglang_mezo.cli", "serve", "--port", str(port), "--host", "127.0.0.1", *extra]
    log = open(os.environ.get("DEMO_SERVER_LOG", "demo-server.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}); see demo-server.log")
        try:
            with urllib.request.urlopen(url + "/model_info", timeout=5):
                return
        except OSError:  # URLError is an OSError
            time.sleep(1)
    raise SystemExit("the server did not start in time; see demo-server.log")


@contextlib.contextmanager
def running_server(flags: list[str]) -> Iterator[str]:
    """``sglang-mezo serve`` with ``flags`` on a free local port, ready; its URL. Stopped (its whole process group)
    on the way out, whatever happened."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, flags)
    try:
        wait_ready(url, server)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def row_name(step: int) -> str:
    return "zero-shot" if step == 0 else f"after {step} MeZO steps"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # 32 steps of FZOO's 9 forwards of 16 reviews: 4,608 example-forwards, a little more than the 120 one-probe
    # steps (3,840) the demo ran under the first recipe
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: the server's recipe's")
    parser.add_argument("--eps", type=float, default=None, help="default: the server's recipe's")
    parser.add_argument("--adaptive", choices=["none", "scalar_rms"], default=None,
                        help="default: the server's recipe's (scalar_rms)")
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--eval-per-class", type=int, default=50)
    parser.add_argument("--train", default=None, metavar="REGEX",
                        help="the checkpoint tensors that train (--mezo-train); default: the recipe's, the final norm")
    parser.add_argument("--last-layers", type=int, default=None, help="train the last K blocks instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = default_model_path()  # converts the embedded GGUF once
    train, held_out = balanced_split(rotten_tomatoes(), [args.train_per_class, args.eval_per_class], args.seed)
    trained = (["--mezo-last-layers", str(args.last_layers)] if args.last_layers else
               ["--mezo-train", args.train] if args.train else [])
    print(f"starting SGLang on CPU with {model.name} (MeZO enabled, training "
          f"{' '.join(trained[1:]) or 'what the recipe chooses'})")
    with running_server(["--model-path", str(model), *trained]) as url:
        client = MezoClient(url)
        # the server evaluates the held-out reviews before the first step and after the last (POST /mezo/step's
        # eval_examples), through SGLang's own request path
        job = client.train({
            "examples": [{"prompt": TEMPLATE.format(text=t), "options": OPTIONS, "label": y} for t, y in train],
            "eval_examples": [{"prompt": TEMPLATE.format(text=t), "options": OPTIONS, "label": y} for t, y in held_out],
            "objective": "classification", "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
            "eval_every": max(1, args.steps // 2),
            **{k: v for k, v in (("lr", args.lr), ("eps", args.eps), ("adaptive", args.adaptive)) if v is not None},
        })
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['status']}: {job['error']}")
        print(format_job(job))
        print(f"the server's recipe: {job['recipe']['why']}")
        rows = "".join(f"| {row_name(e['step'])} | {e['accuracy']:.1%} | {e['loss']:.4f} |\n" for e in job["evals"])
        print(f"\n| held-out (balanced, n={job['evals'][0]['n']}) | accuracy | loss |\n|---|---|---|\n{rows}")

        review = "A warm, funny and beautifully acted film."
        chat = client.request("POST", "/v1/chat/completions", {
            "model": "default", "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "user", "content": f"Review: {review}\nWas the reviewer positive or negative?"}],
        })
        if chat.status != 200:
            raise SystemExit(f"the chat request failed: HTTP {chat.status}: {chat.message}")
        print(f"served by the fine-tuned weights ({client.weights()['weight_version']}): "
              f"{chat.body['choices'][0]['message']['content']!r}")


if __name__ == "__main__":
    main()
