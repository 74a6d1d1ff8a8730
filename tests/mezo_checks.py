"""Checks shared by the server tests: scores as served, jobs run to the end, and the weights every committed
step implies (the base checkpoint with the server's trajectories replayed by the reference engine)."""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.params import TrainableSet
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.engines.hf import HFEngine

# a small completion task the server tests train on
TRAIN = [
    {"prompt": "the movie was", "completion": " great"},
    {"prompt": "the film was", "completion": " terrible"},
    {"prompt": "a great story with", "completion": " great music"},
    {"prompt": "a terrible script,", "completion": " boring scenes"},
]

# fixed token sequences of the tiny test tokenizer, scored through /generate: (prompt ids, completion ids)
PROBE = [([80, 82, 89, 76, 72], [224, 90, 68, 86]), ([87, 75, 72], [224, 80, 82, 89]), ([68, 224], [74, 85, 72])]


def served_logprobs(server, probe=PROBE, *, lora: str | None = None) -> list[list[float]]:
    """Completion-token log-probs as served by /generate (one prefill batch), by the base or by LoRA adapter
    ``lora``."""
    body = {"input_ids": [p + c for p, c in probe], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": 0}
    if lora is not None:
        body["lora_path"] = [lora] * len(probe)
    status, out = server.request("POST", "/generate", body)
    assert status == 200, out
    # entry t (t >= 1) is log p(token t | tokens < t); entry 0 is None
    return [[e[0] for e in o["meta_info"]["input_token_logprobs"][len(p):]] for o, (p, _) in zip(out, probe)]


SERVED_NAMES = ["model.embed_tokens.weight", "model.norm.weight"] + [
    f"model.layers.{i}.{leaf}.weight" for i in range(2) for leaf in (
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj", "input_layernorm",
        "post_attention_layernorm")
]


def served_weights(server) -> dict[str, torch.Tensor]:
    """Every served parameter, read back through SGLang's own /get_weights_by_name."""
    out = {}
    for name in SERVED_NAMES:
        status, values = server.request("GET", "/get_weights_by_name", {"name": name, "truncate_size": 1_000_000})
        assert status == 200, (name, values)
        out[name] = torch.tensor(values)
    return out


def run_job(server, body: dict, timeout_s: float = 300) -> dict:
    status, job = server.request("POST", "/mezo/step", body)
    assert status == 200, job
    deadline = time.monotonic() + timeout_s
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
        job = server.request("GET", f"/mezo/jobs/{job['job_id']}")[1]
    return job


def base_engine(model_path: str) -> HFEngine:
    return HFEngine(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))


def engine_for_served(server, model_path: str, *, last_upto: int | None = None) -> HFEngine:
    """What the served weights must be: the base checkpoint with the history the server says its weights carry
    (GET /mezo/weights) replayed, the last job only up to step ``last_upto`` if given."""
    engine = base_engine(model_path)
    history = server.request("GET", "/mezo/weights")[1]["history"]
    for n, segment in enumerate(history):
        trajectory = server.request("GET", f"/mezo/jobs/{segment['job_id']}/trajectory")[1]
        trajectory = Trajectory.from_dict(trajectory)
        trajectory.records = trajectory.records[: segment["records"]]
        upto = last_upto if n == len(history) - 1 else None
        trajectory.replay(TrainableSet.from_pieces(engine.trainable_pieces(),
                                                   MezoConfig.from_dict(trajectory.config).selection,
                                                   engine.num_layers), upto=upto)
    return engine


def fused(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict of the tiny Llama in SGLang's fused layout (qkv_proj, gate_up_proj)."""
    out = {"model.embed_tokens.weight": state["model.embed_tokens.weight"],
           "model.norm.weight": state["model.norm.weight"]}
    for i in range(2):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.qkv_proj.weight"] = torch.cat([state[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"])
        out[f"{p}.mlp.gate_up_proj.weight"] = torch.cat([state[f"{p}.mlp.{x}_proj.weight"] for x in ("gate", "up")])
        for leaf in ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            out[f"{p}.{leaf}.weight"] = state[f"{p}.{leaf}.weight"]
    return out


def fused_replay(server, model_path: str) -> dict[str, torch.Tensor]:
    """The base checkpoint with the served history replayed by the reference engine, in SGLang's fused layout."""
    return fused(engine_for_served(server, model_path).model.state_dict())


def assert_served_is_replay(server, model_path: str) -> None:
    """Every served weight is bit for bit the reference engine's replay of the served history (SGLang pads the
    vocabulary: its extra rows are no weights)."""
    served = served_weights(server)
    for name, tensor in fused_replay(server, model_path).items():
        assert torch.equal(served[name][: tensor.shape[0]], tensor), name


def hf_logprobs(engine: HFEngine | torch.nn.Module, probe=PROBE) -> list[list[float]]:
    """Completion-token log-probs from a transformers model (or the reference engine's)."""
    model = engine.model if isinstance(engine, HFEngine) else engine
    out = []
    for prompt, completion in probe:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        out.append([lp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(completion)])
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def choice_batch(model_path: str, examples: list[dict]):
    """``examples`` ({"prompt", "options", "label"}) tokenized as the server does."""
    from transformers import AutoTokenizer

    from sglang_mezo.core.objectives import ChoiceExample

    tok = AutoTokenizer.from_pretrained(model_path)
    return [ChoiceExample(tuple(tok(e["prompt"])["input_ids"]),
                          tuple(tuple(tok(o, add_special_tokens=False)["input_ids"]) for o in e["options"]),
                          e["label"]) for e in examples]


def assert_step_scores_per_option(server, model_path: str, examples: list[dict], **job) -> None:
    """One lr = 0 classification step through the server, whose L+ and L- must equal (to 1e-4, SGLang against
    transformers) what the reference engine gives under the same probes scoring every option as its own sequence."""
    from sglang_mezo.core.objectives import Objective, batch_loss_fn
    from sglang_mezo.core.spsa import mezo_step

    engine = engine_for_served(server, model_path)  # the served weights, before the step
    done = run_job(server, {"examples": examples, "steps": 1, "lr": 0.0, "batch_size": len(examples), **job})
    assert done["status"] == "succeeded", done
    served_step = server.request("GET", f"/mezo/jobs/{done['job_id']}/history")[1]["steps"][0]
    trajectory = Trajectory.from_dict(server.request("GET", f"/mezo/jobs/{done['job_id']}/trajectory")[1])
    record = trajectory.records[0]
    params = TrainableSet.from_pieces(engine.trainable_pieces(), MezoConfig.from_dict(trajectory.config).selection,
                                      engine.num_layers)
    loss = batch_loss_fn(engine, Objective.CLASSIFICATION, choice_batch(model_path, examples), share_prompts=False)
    reference = mezo_step(params, loss, record.seeds, eps=record.eps, lr=0.0, kind=trajectory.z_kind)
    for served, expected in ((served_step["loss_plus"], reference.loss_plus),
                             (served_step["loss_minus"], reference.loss_minus)):
        assert max(abs(a - b) for a, b in zip(served, expected, strict=True)) <= 1e-4, (served, expected)
