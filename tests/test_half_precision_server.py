"""A bfloat16 server on CPU, over HTTP: without fp32 masters it refuses to train (naming the flag); with them an
lr = 0 job leaves the served weights bit-identical, a trained master is the fp32 update-only replay of its
trajectory bit for bit (the served weights its rounding), and save and reset keep those promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mezo_checks import SERVED_NAMES, TRAIN, base_engine, fused, run_job, served_weights
from safetensors.torch import load_file
from servers import PAPER_STEP, running_server
from tiny_models import save_tiny_llama

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.params import TrainableSet
from sglang_mezo.core.trajectory import Trajectory

pytestmark = pytest.mark.server  # starts real SGLang servers


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=5)  # an fp32 checkpoint


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("out")


@pytest.fixture(scope="module")
def server(model_path, output_dir, tmp_path_factory):
    with running_server(model_path, *PAPER_STEP, "--dtype", "bfloat16", "--mezo-master", "device",
                        "--mezo-z-kind", "gaussian", "--mezo-output-dir", str(output_dir), log_dir=tmp_path_factory.mktemp("logs")) as srv:
        yield srv


def update_only_replay(server, model_path: str) -> dict[str, torch.Tensor]:
    """The fp32 base checkpoint with the served history's updates applied, one pass a step (no probes)."""
    engine = base_engine(model_path)
    for segment in server.request("GET", "/mezo/weights")[1]["history"]:
        trajectory = Trajectory.from_dict(server.request("GET", f"/mezo/jobs/{segment['job_id']}/trajectory")[1])
        trajectory.records = trajectory.records[: segment["records"]]
        params = TrainableSet.from_pieces(engine.trainable_pieces(), MezoConfig.from_dict(trajectory.config).selection,
                                          engine.num_layers)
        trajectory.replay(params, exact=False)
    return engine.model.state_dict()


def assert_saved_masters_are_the_replay(server, model_path: str, folder: Path) -> dict[str, torch.Tensor]:
    """POST /mezo/save into ``folder`` (inside the output dir): the saved tensors are the masters, in the base
    checkpoint's fp32, and equal the update-only replay bit for bit. Returns the replay's state dict."""
    status, saved = server.request("POST", "/mezo/save", {"path": folder.name})
    assert status == 200, saved
    written = {}
    for file in folder.glob("*.safetensors"):
        written.update(load_file(str(file)))
    expected = update_only_replay(server, model_path)
    for name in saved["tensors"]:
        assert written[name].dtype == torch.float32
        assert torch.equal(written[name], expected[name]), name
    return expected


def test_a_bf16_server_without_masters_refuses_to_train_and_says_which_flag(model_path, tmp_path):
    with running_server(model_path, "--dtype", "bfloat16", log_dir=tmp_path) as srv:
        before = served_weights(srv)
        status, body = srv.request("POST", "/mezo/step", {"examples": TRAIN, "steps": 2, "lr": 1e-2})
        assert status == 400 and "--mezo-master" in body["message"], body
        status, body = srv.request("POST", "/mezo/diagnose", {"examples": TRAIN, "eps": [1e-3], "probes": 1})
        assert status == 400 and "--mezo-master" in body["message"], body
        precision = srv.request("GET", "/mezo/weights")[1]["precision"]
        assert precision["served_dtype"] == "bfloat16" and not precision["can_train"]
        assert "--mezo-master" in precision["reason"] and precision["master_bytes_per_parameter"] == 0
        after = served_weights(srv)
        assert all(torch.equal(before[n], after[n]) for n in SERVED_NAMES)


def test_lr_zero_for_50_steps_leaves_the_bf16_weights_bit_identical(server):
    precision = server.request("GET", "/mezo/weights")[1]["precision"]
    assert precision == {"served_dtype": "bfloat16", "master": "device", "master_bytes_per_parameter": 4,
                         "can_train": True, "reason": ""}
    before = served_weights(server)
    job = run_job(server, {"examples": TRAIN, "steps": 50, "lr": 0.0, "eps": 1e-2, "batch_size": 2, "seed": 1})
    assert job["status"] == "succeeded", job
    after = served_weights(server)
    for name in SERVED_NAMES:
        assert torch.equal(before[name], after[name]), name


def test_a_trained_master_is_the_fp32_update_only_replay_and_saves_and_resets_exactly(server, model_path,
                                                                                        output_dir):
    start = served_weights(server)
    job = run_job(server, {"examples": TRAIN, "steps": 200, "lr": 3e-3, "eps": 1e-3, "batch_size": 2, "seed": 2})
    assert job["status"] == "succeeded", job
    served = served_weights(server)
    assert not torch.equal(served["model.layers.1.mlp.down_proj.weight"], start["model.layers.1.mlp.down_proj.weight"])

    expected = assert_saved_masters_are_the_replay(server, model_path, output_dir / "bf16-run")

    # the served weights are the masters rounded once
    assert_served_rounds(served, expected)
    # a reset re-reads the base into the masters and replays: half-way, then the base itself
    history = server.request("GET", "/mezo/weights")[1]["history"]
    status, body = server.request("POST", "/mezo/reset", {"job_id": history[-1]["job_id"], "step": 100})
    assert status == 200, body
    assert server.request("GET", "/mezo/weights")[1]["history"][-1]["steps"] == 100
    assert_served_rounds(served_weights(server), update_only_replay(server, model_path))
    assert server.request("POST", "/mezo/reset", {})[0] == 200
    base = served_weights(server)
    assert all(torch.equal(base[n], start[n]) for n in SERVED_NAMES)


def assert_served_rounds(served: dict[str, torch.Tensor], masters: dict[str, torch.Tensor]) -> None:
    """Every served weight is the bf16 rounding of its fp32 master (SGLang pads the vocabulary: no weights)."""
    for name, master in fused(masters).items():
        assert torch.equal(served[name][: master.shape[0]], master.to(torch.bfloat16).float()), name


def test_tp2_bf16_masters_shard_tear_recover_and_save_as_the_fp32_replay(tmp_path):
    """--tp 2 in bf16: each rank's masters hold its shards (a KV head replicated on both); a torn pass on rank 1
    (through the masters: both copies torn) is recovered by re-reading the checkpoint into the masters; the saved
    masters are the fp32 update-only replay of the kept history, bit for bit."""
    model_path = save_tiny_llama(tmp_path / "model", seed=7, num_key_value_heads=1)
    out = tmp_path / "out"
    with running_server(model_path, *PAPER_STEP, "--tp", "2", "--dtype", "bfloat16", "--mezo-master", "device",
                        "--mezo-z-kind", "gaussian", "--mezo-output-dir", str(out), log_dir=tmp_path,
                        env={"SGLANG_MEZO_INJECT_FAULT": "torn@2/12:2#1"}) as server:
        body = {"examples": TRAIN, "lr": 3e-3, "eps": 1e-3, "batch_size": 2}
        assert run_job(server, {**body, "steps": 30, "seed": 1})["status"] == "succeeded"
        torn = run_job(server, {**body, "steps": 20, "seed": 2})
        assert torn["status"] == "failed" and torn["step"] == 12, torn
        assert "restored to the last committed step" in torn["error"] and not torn["weights_inconsistent"], torn
        assert_saved_masters_are_the_replay(server, model_path, out / "tp2")
