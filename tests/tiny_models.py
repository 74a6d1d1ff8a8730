"""Tiny models and data built locally for tests (nothing comes from a hub)."""

from __future__ import annotations

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sglang_mezo.core.objectives import CompletionExample


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random 2-layer Llama (~20k parameters, tied embeddings), the same for the same seed."""
    torch.manual_seed(seed)  # tests only: the server never touches the global RNG
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def memorisation_task(n: int = 8, prompt_len: int = 5, completion_len: int = 3, vocab: int = 64,
                      seed: int = 0) -> list[CompletionExample]:
    """n random prompt -> completion pairs to memorise (token ids >= 4, leaving room for special tokens)."""
    rng = random.Random(seed)
    return [
        CompletionExample(
            tuple(rng.randrange(4, vocab) for _ in range(prompt_len)),
            tuple(rng.randrange(4, vocab) for _ in range(completion_len)),
        )
        for _ in range(n)
    ]


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                        what: str = "") -> None:
    """torch.allclose with a message naming the first mismatching indices and values."""
    actual, expected = actual.double(), expected.double()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = [f"  at {tuple(i)}: {actual[tuple(i)].item():.9g} vs {expected[tuple(i)].item():.9g}" for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); first:\n"
            + "\n".join(rows)
        )
