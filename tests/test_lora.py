"""core.lora: an adapter's PEFT names and shapes (as peft itself writes them), its seeded start, its spec."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from tiny_models import tiny_llama

from sglang_mezo.core.lora import (MODULES, AdapterStart, LoraSpec, ModelDims, initial_weights, parse_peft_name,
                                   peft_manifest, peft_name, replay_adapter, save_peft_adapter)
from sglang_mezo.core.spsa import sgd_update
from sglang_mezo.core.trajectory import StepRecord, Trajectory
from sglang_mezo.kernels import ZKind


@pytest.mark.parametrize("targets", [MODULES, ("q_proj", "v_proj")])
def test_the_manifest_is_what_peft_writes_and_a_saved_folder_loads_in_peft(tmp_path, targets):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    model = tiny_llama(0)
    spec = LoraSpec(rank=4, alpha=8, target_modules=targets)
    peft_state = get_peft_model_state_dict(get_peft_model(tiny_llama(0), LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0)))
    manifest = peft_manifest(ModelDims.of(model.config), spec)
    assert manifest == {n: tuple(t.shape) for n, t in peft_state.items()}
    tensors = initial_weights(ModelDims.of(model.config), spec)
    save_peft_adapter(tmp_path / "a", tensors, spec.peft_config())
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(model, str(tmp_path / "a")))
    assert all(torch.equal(loaded[n], tensors[n]) for n in manifest)


def test_a_fresh_adapter_is_seeded_b_zero_and_a_at_peft_s_variance():
    dims = ModelDims(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, layers=2)
    spec = LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "down_proj"), init_seed=3)
    a, b = initial_weights(dims, spec), initial_weights(dims, spec)
    assert all(torch.equal(a[n], b[n]) for n in a)  # the same seed, the same start, bit for bit
    other = initial_weights(dims, LoraSpec(8, 16, ("q_proj", "down_proj"), init_seed=4))
    for name, t in a.items():
        layer, module, part = parse_peft_name(name)
        if part == "lora_B":
            assert not t.any()
        else:
            assert not torch.equal(t, other[name])
            assert t.std().item() == pytest.approx(1 / math.sqrt(3 * t.shape[1]), rel=0.25)


def test_a_spec_keeps_peft_s_module_order_round_trips_and_refuses_nonsense():
    spec = LoraSpec(rank=2, alpha=4.0, target_modules=("v_proj", "q_proj"))
    assert spec.target_modules == ("q_proj", "v_proj") and spec.scaling == 2.0
    assert LoraSpec.from_dict(spec.to_dict()) == spec
    assert LoraSpec.from_peft_config(spec.peft_config()) == spec
    for bad in ({"rank": 0, "alpha": 1, "target_modules": ("q_proj",)},
                {"rank": 2, "alpha": 0, "target_modules": ("q_proj",)},
                {"rank": 2, "alpha": 1, "target_modules": ("lm_head",)}):
        with pytest.raises(ValueError):
            LoraSpec(**bad)
    with pytest.raises(ValueError):
        parse_peft_name("model.layers.0.self_attn.q_proj.weight")


DIMS = ModelDims(hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=8, layers=2)


def _steps(first: int, count: int, seed: int) -> list[StepRecord]:
    """Committed steps as a job records them (seed, projected gradient, lr: a plain SGD update)."""
    out = []
    for step in range(first, first + count):
        grads = (0.5 - 0.1 * step, 0.25 + 0.05 * step)
        out.append(StepRecord(step=step, seeds=(seed + 2 * step, seed + 2 * step + 1), projected_grads=grads, lr=1e-2,
                              weight_decay=0.0, eps=1e-3, update=sgd_update(grads, 1e-2)))
    return out


def _trajectory(spec: LoraSpec, records: list[StepRecord]) -> Trajectory:
    return Trajectory(z_kind=ZKind.RADEMACHER, trainable_fingerprint="", trainable_names=[], records=records,
                      adapter=spec.to_dict())


def test_a_job_started_from_a_trained_adapter_replays_as_one_run_of_both_jobs_steps():
    first = LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), init_seed=5)
    records = _steps(0, 6, seed=11)
    # the second job's spec embeds the first's trajectory up to the version it started from (4 of its 6 steps)
    second = LoraSpec(4, 8, ("q_proj", "v_proj"), init_seed=9,
                      start=AdapterStart(trajectory=_trajectory(first, records).upto(4)))
    more = _steps(0, 3, seed=40)
    continued = replay_adapter(DIMS, second, more, ZKind.RADEMACHER)
    at_once = replay_adapter(DIMS, first, records[:4] + more, ZKind.RADEMACHER)
    assert all(torch.equal(continued[n], at_once[n]) for n in at_once)  # bit for bit
    assert not torch.equal(continued[peft_name(0, "q_proj", "lora_B")], initial_weights(DIMS, first)[
        peft_name(0, "q_proj", "lora_B")])
    # the record travels as JSON (a trajectory header, a journal line) and comes back equal, start and all
    assert LoraSpec.from_dict(json.loads(json.dumps(second.to_dict()))) == second
    third = LoraSpec(4, 8, ("q_proj", "v_proj"), start=AdapterStart(trajectory=_trajectory(second, more)))
    chained = replay_adapter(DIMS, third, [], ZKind.RADEMACHER)  # a chain of three jobs, rebuilt recursively
    assert all(torch.equal(chained[n], continued[n]) for n in continued)
    with pytest.raises(ValueError, match="rank 4"):  # another shape is another function: refused
        initial_weights(DIMS, LoraSpec(8, 8, ("q_proj", "v_proj"), start=second.start))


def test_a_peft_folder_start_is_its_tensors_and_a_folder_that_changed_is_refused(tmp_path):
    spec = LoraSpec(rank=2, alpha=4, target_modules=("q_proj", "v_proj", "gate_proj", "up_proj"))
    tensors = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
               for i, (n, t) in enumerate(initial_weights(DIMS, spec).items())}
    folder = save_peft_adapter(tmp_path / "peft", tensors, spec.peft_config(), dtype=torch.bfloat16)
    read = AdapterStart.of_peft_folder(folder)
    assert read.same_shape(spec) and read.start.peft_path == str(folder.resolve()) and len(read.start.sha256) == 64
    loaded = initial_weights(DIMS, read)
    assert all(torch.equal(loaded[n], tensors[n].bfloat16().float()) for n in tensors)
    assert LoraSpec.from_dict(json.loads(json.dumps(read.to_dict()))) == read
    with pytest.raises(ValueError, match="other shapes"):  # a model of other sizes
        initial_weights(dataclasses.replace(DIMS, hidden=64), read)
    save_peft_adapter(folder, {n: t * 2 for n, t in tensors.items()}, spec.peft_config())
    with pytest.raises(ValueError, match="changed"):
        initial_weights(DIMS, read)
    (folder / "adapter_config.json").write_text(json.dumps({**spec.peft_config(), "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        AdapterStart.of_peft_folder(folder)
    with pytest.raises(ValueError, match="readable"):
        AdapterStart.of_peft_folder(tmp_path / "nothing")
