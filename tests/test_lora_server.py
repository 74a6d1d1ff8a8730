"""SGLang's own LoRA serving in a CPU server with the plugin (the ground the adapter jobs stand on): with
``--enable-lora`` and the torch-native LoRA backend the server starts on a machine without CUDA (SGLang pins host
tensors, which needs a driver: ``sglang_mezo.plugin.pinning``), a PEFT adapter saved by ``peft`` is served with the
log-probs transformers + peft give, and the base keeps being served as the plain checkpoint."""

from __future__ import annotations

import pytest
import torch
from mezo_checks import hf_logprobs, max_diff, served_logprobs
from servers import running_server
from tiny_models import save_tiny_llama
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.server  # starts a real SGLang server

LORA_FLAGS = ("--enable-lora", "--lora-backend", "torch_native", "--max-lora-rank", "8", "--lora-target-modules",
              "q_proj", "v_proj", "--max-loras-per-batch", "3")


def save_peft_adapter(model_path: str, out, seed: int, r: int = 8, alpha: int = 16) -> str:
    """A LoRA adapter of q_proj and v_proj written by ``peft``, with random A and B (B starts at zero in peft, which
    would make an adapter that changes nothing)."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    adapted = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                               lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    adapted.save_pretrained(out)
    return str(out)


def peft_model(model_path: str, adapter: str) -> torch.nn.Module:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).eval()


def test_a_peft_adapter_is_served_as_peft_computes_it_and_the_base_as_the_checkpoint(tmp_path):
    model_path = save_tiny_llama(tmp_path / "base", seed=4)
    adapter = save_peft_adapter(model_path, tmp_path / "adapter", seed=1)
    with running_server(model_path, *LORA_FLAGS, "--lora-paths", f"tenant-a={adapter}",
                        log_dir=tmp_path) as server:
        served_adapter = served_logprobs(server, lora="tenant-a")
        served_base = served_logprobs(server)
    plain = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    assert max_diff(served_base, hf_logprobs(plain)) < 1e-5
    assert max_diff(served_adapter, hf_logprobs(peft_model(model_path, adapter))) < 1e-5
    assert max_diff(served_adapter, served_base) > 1e-2  # the adapter does change what is served


def test_pinning_off_makes_pinned_host_tensors_plain_ones_and_puts_torch_back():
    from sglang_mezo.plugin.pinning import FACTORIES, pinning_off

    if torch.cuda.is_available():
        pytest.skip("with CUDA, pinning works and pinning_off changes nothing")
    originals = {name: getattr(torch, name) for name in FACTORIES}
    with pinning_off():
        with pinning_off():  # re-entrant: SGLang's LoRA methods call one another
            t = torch.tensor([1, 2], dtype=torch.int32, pin_memory=True)
        z = torch.zeros((3,), pin_memory=True).pin_memory()
        assert t.tolist() == [1, 2] and z.tolist() == [0.0, 0.0, 0.0]
        assert not t.is_pinned()
    assert {name: getattr(torch, name) for name in FACTORIES} == originals
    with pytest.raises(RuntimeError):  # outside, pinning needs a driver again, as in stock torch
        torch.zeros((3,), pin_memory=True)
