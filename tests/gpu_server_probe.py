"""SGLang itself, with --enable-mezo, on CUDA weights: the check ``benchmarks/gpu_server_check.sh run`` makes on a GPU
machine (no test runner: a script that reports what happened, whatever happens).

It builds a random-weight Llama of SmolLM2-135M's width (fewer layers, a BPE tokenizer trained here), starts
``python -m sglang.launch_server`` on it in bf16 with fp32 masters on the device, torch-native attention and
sampling, and then, over HTTP:

1. a greedy /generate with log-probs (the base);
2. an lr = 0 job of a few steps: through fp32 masters the served weights must come back bit for bit, so the same
   request must give the same tokens and log-probs;
3. a short training job: its losses, its step times, the served weight version it leaves;
4. /generate again (served by the fine-tuned weights, labelled so);
5. a reset: the base's log-probs again.

With ``--adapters`` (the adapters issue's H200 targets), a second server with SGLang's LoRA pool (``--lora-backend``,
default SGLang's own ``csgmv``) and, over HTTP:

6. base ``/generate`` latency from a few client threads with no job, then during a rank-8 adapter job (n = 4
   probes, every module): p50 and p99, and their ratio (target: p99 ≤ 1.3× idle);
7. the same adapter steps with the 2n probe adapters in one forward batch and one forward each (no traffic): the
   median step time of each (target: batched ≤ 0.5×);
8. the adapter served by name after its job, and the base's log-probs unchanged by it.

CUDA graphs: SGLang 0.5.23 turns them off for torch-native attention (``arg_groups/attention_hook.py``), and the
backends that capture them (flashinfer, FA3) cannot travel to that machine, so this check does not exercise them.
Writes ``server_check.json`` and the server's log tail to the folder it is given, and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from servers import running_server  # noqa: E402
from tiny_models import save_tiny_llama  # noqa: E402

# SGLang on CUDA without its kernel wheels (docs/gpu.md): every fused op takes its pure-torch path, the radix tree
# its Python core, and the sgl_kernel version check is off (the stand-in has no version to check).
ENV = {"SGLANG_FORCE_FUSED_OP_BACKEND": "torch", "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
       "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python", "SGLANG_IS_FLASHINFER_AVAILABLE": "false"}
FLAGS = ["--dtype", "bfloat16", "--mezo-master", "device", "--attention-backend", "torch_native",
         "--sampling-backend", "pytorch", "--mem-fraction-static", "0.3", "--max-total-tokens", "32768",
         "--mezo-n-probes", "1"]
EXAMPLES = [{"prompt": f"the movie was {w}. It was", "completion": f" {y}"}
            for w, y in (("wonderful", "great"), ("boring", "terrible"), ("great fun", "great"),
                         ("a sad mess", "terrible"))] * 4
PROBE = {"input_ids": [[1, 20, 30, 40, 50, 60]], "sampling_params": {"max_new_tokens": 8, "temperature": 0.0},
         "return_logprob": True, "logprob_start_len": 0}


def generate(server) -> dict:
    status, body = server.request("POST", "/generate", PROBE, timeout=120)
    if status != 200:
        raise RuntimeError(f"/generate answered {status}: {str(body)[:500]}")
    meta = body[0]["meta_info"]
    return {"tokens": body[0]["output_ids"], "weight_version": meta.get("weight_version"),
            "input_logprobs": [e[0] for e in meta["input_token_logprobs"]],
            "output_logprobs": [e[0] for e in meta["output_token_logprobs"]]}


def job(server, body: dict) -> dict:
    done = server.client.wait(server.client.submit(body)["job_id"], progress=False)
    history = server.client.request("GET", f"/mezo/jobs/{done['job_id']}/history", admin=True).body
    return {"status": done["status"], "error": done.get("error"), "weight_version": done.get("weight_version"),
            "losses": [s.get("loss") for s in history.get("steps", [])],
            "step_ms": [s.get("step_ms") for s in history.get("steps", [])]}


def check(model: str, log_dir: Path, startup_timeout_s: float) -> dict:
    flags = [*FLAGS, "--mezo-output-dir", str(log_dir / "out")]
    result: dict = {"flags": flags, "env": ENV}
    started = time.monotonic()
    with running_server(model, *flags, log_dir=log_dir, env=ENV, startup_timeout_s=startup_timeout_s) as server:
        result["startup_s"] = round(time.monotonic() - started, 1)
        result["weights"] = server.client.weights()
        base = generate(server)
        result["base"] = base
        result["lr0_job"] = job(server, {"examples": EXAMPLES, "steps": 4, "batch_size": 8, "lr": 0.0, "seed": 1})
        after_lr0 = generate(server)
        result["lr0_bit_identical"] = (after_lr0["tokens"] == base["tokens"]
                                       and after_lr0["input_logprobs"] == base["input_logprobs"]
                                       and after_lr0["output_logprobs"] == base["output_logprobs"])
        result["train_job"] = job(server, {"examples": EXAMPLES, "steps": 12, "batch_size": 8, "lr": 1e-2,
                                           "eps": 1e-2, "adaptive": "scalar_rms", "seed": 2})
        trained = generate(server)
        result["trained"] = trained
        result["trained_differs"] = trained["input_logprobs"] != base["input_logprobs"]
        result["reset"] = server.client.reset()
        again = generate(server)
        result["reset_equals_base"] = again["input_logprobs"] == base["input_logprobs"]
    return result


ADAPTER_FLAGS = ["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all",
                 "--max-loras-per-batch", "10"]


def _latencies(server, stop, out: list[float]) -> None:
    """Base /generate requests, one after another, until ``stop``: each one's seconds (errors raise)."""
    while not stop.is_set():
        started = time.perf_counter()
        status, body = server.request("POST", "/generate", {**PROBE, "return_logprob": False}, timeout=120)
        if status != 200:
            raise RuntimeError(f"/generate answered {status} under traffic: {str(body)[:300]}")
        out.append(time.perf_counter() - started)


def _traffic(server, clients: int, run) -> tuple[list[float], object]:
    """``run()``'s result and the latencies of ``clients`` threads of base traffic meanwhile."""
    import threading

    stop, out, errors = threading.Event(), [], []

    def loop() -> None:
        try:
            _latencies(server, stop, out)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        result = run()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=130)
    if errors:
        raise errors[0]
    return out, result


def _quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "p50_ms": round(1e3 * at(0.5), 2), "p99_ms": round(1e3 * at(0.99), 2)}


def check_adapters(model: str, log_dir: Path, startup_timeout_s: float, backend: str, clients: int = 4) -> dict:
    import statistics

    flags = [*FLAGS, *ADAPTER_FLAGS, "--lora-backend", backend, "--mezo-n-probes", "4"]
    result: dict = {"flags": flags}
    adapter = {"rank": 8}
    body = {"examples": EXAMPLES, "batch_size": 8, "lr": 1e-3, "eps": 1e-2, "n_probes": 4, "adaptive": "scalar_rms"}
    with running_server(model, *flags, log_dir=log_dir, env=ENV, startup_timeout_s=startup_timeout_s) as server:
        base = generate(server)
        _traffic(server, clients, lambda: time.sleep(5))  # warm-up, not measured
        idle, _ = _traffic(server, clients, lambda: time.sleep(15))
        during, trained = _traffic(server, clients, lambda: job(server, {
            **body, "steps": 40, "seed": 1, "adapter": {**adapter, "name": "under-traffic"}}))
        result["idle"], result["during_adapter_job"] = _quantiles(idle), _quantiles(during)
        result["p99_ratio"] = round(result["during_adapter_job"]["p99_ms"] / result["idle"]["p99_ms"], 3)
        result["p50_ratio"] = round(result["during_adapter_job"]["p50_ms"] / result["idle"]["p50_ms"], 3)
        result["traffic_job"] = {k: trained[k] for k in ("status", "error", "weight_version")}
        steps = {}
        for together in (True, False):
            done = job(server, {**body, "steps": 10, "seed": 2, "adapter": {
                **adapter, "name": f"batched-{together}", "probes_in_one_batch": together}})
            steps[together] = done
            result[f"probes_in_one_batch={together}"] = {"status": done["status"], "error": done["error"],
                                                        "step_ms": done["step_ms"]}
        if all(steps[t]["status"] == "succeeded" for t in steps):
            one, each = (statistics.median(steps[t]["step_ms"][1:]) for t in (True, False))
            result["batched_step_ratio"] = round(one / each, 3)  # the first step registers the probe adapters
        served = server.request("POST", "/generate", {**PROBE, "lora_path": "under-traffic"}, timeout=120)
        result["adapter_served"] = served[0] == 200 and served[1][0]["meta_info"]["input_token_logprobs"] != [
            [e] for e in base["input_logprobs"]]
        result["base_unchanged"] = generate(server)["input_logprobs"] == base["input_logprobs"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--adapters", action="store_true", help="also the adapter check (a second server)")
    parser.add_argument("--lora-backend", default="csgmv")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_llama(Path(tmp) / "model", seed=3, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3)
        log_dir = Path(tmp) / "logs"
        log_dir.mkdir()
        try:
            report.update(check(model, log_dir, startup_timeout_s=180))
        except Exception as exc:  # noqa: BLE001 - what broke is the finding: report it
            report.update(error=f"{type(exc).__name__}: {exc}"[:4000], traceback=traceback.format_exc()[-4000:])
        if args.adapters:
            adapter_logs = log_dir / "adapters"
            adapter_logs.mkdir()
            try:
                report["adapters"] = check_adapters(model, adapter_logs, 180, args.lora_backend)
            except Exception as exc:  # noqa: BLE001
                report["adapters"] = {"error": f"{type(exc).__name__}: {exc}"[:4000],
                                      "traceback": traceback.format_exc()[-4000:]}
            for log in adapter_logs.glob("server-*.log"):
                (args.out / "server-adapters.log").write_text(log.read_text(errors="replace")[-20000:])
        for log in log_dir.glob("server-*.log"):
            (args.out / "server.log").write_text(log.read_text(errors="replace")[-20000:])
    (args.out / "server_check.json").write_text(json.dumps(report, indent=1, default=str))
    if "error" in report:
        print(f"FAILED: {report['error'][:1500]}")
        sys.exit(1)
    print(f"up in {report['startup_s']} s; lr=0 job {report['lr0_job']['status']}, bit-identical after it: "
          f"{report['lr0_bit_identical']}; training job {report['train_job']['status']}, losses "
          f"{report['train_job']['losses']}, step ms {report['train_job']['step_ms']}; served version "
          f"{report['trained']['weight_version']}, log-probs moved: {report['trained_differs']}; reset back to the "
          f"base: {report['reset_equals_base']}")
    if "adapters" in report:
        print(f"adapters: {json.dumps(report['adapters'])[:3000]}")


if __name__ == "__main__":
    main()
