"""core.lora: an adapter's PEFT names and shapes (as peft itself writes them), its seeded start, its spec."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_llama

from sglang_mezo.core.lora import (MODULES, LoraSpec, ModelDims, initial_weights, parse_peft_name, peft_manifest,
                                   save_peft_adapter)


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
