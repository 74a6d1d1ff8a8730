"""The main job, end to end on a CPU: `make demo`.

1. start `sglang-mezo serve` (SGLang on CPU, embedded SmolLM2-135M-Instruct, --enable-mezo);
2. measure the served model on a balanced held-out set of Rotten Tomatoes reviews (MeZO's prompt:
   "<review> It was" -> " great" / " terrible"): accuracy and loss, through SGLang's own /generate;
3. train it over HTTP with MeZO (POST /mezo/step, classification objective), following the job's progress;
4. measure again, then send one /v1/chat/completions request, served by the fine-tuned weights;
5. stop the server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tqdm import tqdm
from transformers import AutoTokenizer

from sglang_mezo.default_model import default_model_path
from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes

TEMPLATE = "{text} It was"
OPTIONS = [" terrible", " great"]  # label 0 = rotten, 1 = fresh


def call(url: str, path: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def evaluate(url: str, tokenizer, examples: list[tuple[str, int]]) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the length-normalised option log-likelihoods, scored by the server."""
    prompts = [tokenizer(TEMPLATE.format(text=t))["input_ids"] for t, _ in examples]
    options = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in OPTIONS]
    seqs = [(p, o) for p in prompts for o in options]
    scores = []
    for start in range(0, len(seqs), 64):
        batch = seqs[start : start + 64]
        out = call(url, "/generate", {"input_ids": [p + o for p, o in batch], "sampling_params": {"max_new_tokens": 0},
                                      "return_logprob": True, "logprob_start_len": 0})
        for (p, o), r in zip(batch, out):
            lps = [e[0] for e in r["meta_info"]["input_token_logprobs"][len(p):]]
            scores.append(sum(lps) / len(lps))
    correct, loss = 0, 0.0
    for i, (_, label) in enumerate(examples):
        logits = scores[i * len(OPTIONS) : (i + 1) * len(OPTIONS)]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(s - top) for s in logits))
        loss += log_z - logits[label]
        correct += int(logits.index(top) == label)
    return correct / len(examples), loss / len(examples)


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
            call(url, "/model_info", timeout=5)
            return
        except (OSError, urllib.error.URLError):
            time.sleep(1)
    raise SystemExit("the server did not start in time; see demo-server.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--eval-per-class", type=int, default=50)
    parser.add_argument("--last-layers", type=int, default=4, help="train the last K blocks (CPU: keeps passes cheap)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = default_model_path()  # converts the embedded GGUF once
    tokenizer = AutoTokenizer.from_pretrained(model)
    train, held_out = balanced_split(rotten_tomatoes(), [args.train_per_class, args.eval_per_class], args.seed)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    print(f"starting SGLang on CPU with {model.name} (MeZO enabled, last {args.last_layers} layers trainable)")
    server = start_server(port, ["--model-path", str(model), "--mezo-last-layers", str(args.last_layers)])
    try:
        wait_ready(url, server)
        acc0, loss0 = evaluate(url, tokenizer, held_out)
        print(f"before: accuracy {acc0:.1%}  loss {loss0:.4f}  ({len(held_out)} held-out reviews, balanced)")

        job = call(url, "/mezo/step", {
            "examples": [{"prompt": TEMPLATE.format(text=t), "options": OPTIONS, "label": y} for t, y in train],
            "objective": "classification", "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "eps": args.eps, "seed": args.seed,
        })
        with tqdm(total=args.steps, desc="MeZO", unit="step") as bar:
            while job["status"] in ("queued", "running"):
                time.sleep(0.5)
                job = call(url, f"/mezo/jobs/{job['job_id']}")
                bar.update(job["step"] - bar.n)
                if job["last"]:
                    bar.set_postfix(loss=f"{(job['last']['loss_plus'][0] + job['last']['loss_minus'][0]) / 2:.4f}")
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['status']}: {job['error']}")
        print(f"trained {job['step']} steps in {job['elapsed_s']:.0f} s "
              f"({job['zero_grad_steps']} with zero projected gradient)")

        acc1, loss1 = evaluate(url, tokenizer, held_out)
        print(f"after:  accuracy {acc1:.1%}  loss {loss1:.4f}")
        print(f"| held-out (balanced, n={len(held_out)}) | accuracy | loss |\n|---|---|---|\n"
              f"| zero-shot | {acc0:.1%} | {loss0:.4f} |\n| after {job['step']} MeZO steps | {acc1:.1%} | {loss1:.4f} |")

        review = "A warm, funny and beautifully acted film."
        chat = call(url, "/v1/chat/completions", {
            "model": "default", "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "user", "content": f"Review: {review}\nWas the reviewer positive or negative?"}],
        })
        print(f"served by the fine-tuned weights: {chat['choices'][0]['message']['content']!r}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
