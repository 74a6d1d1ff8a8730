"""Tiny models and data built locally for tests (nothing comes from a hub)."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sglang_mezo.core.objectives import CompletionExample
from sglang_mezo.core.params import TrainablePiece, TrainableSet


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


TOKENIZER_CORPUS = [
    "the movie was great and the acting was wonderful",
    "the film was terrible and the plot was boring",
    "a great story with great music and a happy end",
    "a terrible script, boring scenes and a sad end",
    "It was great. It was terrible. What is the answer?",
    "user assistant system hello world yes no good bad fine",
]


def save_tiny_llama(path, seed: int = 0, vocab_size: int = 256, **overrides) -> str:
    """Write a tiny random Llama and a BPE tokenizer trained on a few sentences to ``path``; return the path.

    Everything is built here, offline, in about a second. The tokenizer has a chat template and an end token so
    that SGLang's chat endpoint works with it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    config = tiny_llama_config(vocab_size=len(fast), bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                               pad_token_id=fast.pad_token_id, max_position_embeddings=256, **overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


class FlakyLoss:
    """A step's loss function that fails on plan: ``plan[attempt]`` is the loss call (1-based) of that step attempt
    that raises ``RuntimeError`` (negative: the call returns NaN instead); other calls score with ``loss``. Call
    :meth:`next_attempt` after each step attempt."""

    def __init__(self, loss: Callable[[], float], plan: dict[int, int]) -> None:
        self.loss, self.plan = loss, plan
        self.attempt = self.call = 0

    def __call__(self) -> float:
        self.call += 1
        fail_at = self.plan.get(self.attempt, 0)
        if self.call == fail_at:
            raise RuntimeError("scorer died")
        return math.nan if self.call == -fail_at else self.loss()

    def next_attempt(self) -> None:
        self.attempt += 1
        self.call = 0


def train_through_failures(run, loss: FlakyLoss) -> None:
    """Step ``run`` (a :class:`~sglang_mezo.core.run.MezoRun`) to its config's total steps, each attempt scored by
    ``loss``: the planned failures (RuntimeError, and NonFiniteLossError, which is one) are recorded, not raised."""
    while run.next_step < run.config.total_steps:
        with contextlib.suppress(RuntimeError):
            run.step(loss)
        loss.next_attempt()


def quadratic() -> tuple[TrainableSet, dict[str, torch.Tensor], Callable[[], float], torch.Tensor]:
    """L = ½ Σ a_i (θ_i - t_i)² over a (16, 8) weight and an (8,) bias, curvatures a_i in [0.5, 2]: ∇L = a⊙(θ - t).
    Returns the set, the tensors, the loss (in float64, so the finite differences see no fp32 noise) and ∇L at θ."""
    gen = torch.Generator().manual_seed(3)
    tensors = {"a.weight": torch.randn(16, 8, generator=gen) * 0.1, "a.bias": torch.randn(8, generator=gen) * 0.1}
    curv = {n: 0.5 + 1.5 * torch.rand(t.shape, generator=gen, dtype=torch.float64) for n, t in tensors.items()}
    target = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.1 for n, t in tensors.items()}
    params = TrainableSet.from_pieces([TrainablePiece(n, t, tuple(t.shape)) for n, t in tensors.items()])

    def loss() -> float:
        return 0.5 * sum(float((curv[n] * (t.double() - target[n]) ** 2).sum()) for n, t in tensors.items())

    grad = torch.cat([(curv[n] * (t.double() - target[n])).flatten() for n, t in tensors.items()])
    return params, tensors, loss, grad


def mean_step(tensors: dict[str, torch.Tensor], steps: int, step: Callable[[int], object]) -> torch.Tensor:
    """The mean update of ``step(k)`` for k < ``steps``, each taken from the same start (``tensors`` put back
    before every step, and left at the start after the last): what a step estimates, in float64, flattened."""
    start = {n: t.clone() for n, t in tensors.items()}
    total = None
    for k in range(steps):
        for n, t in tensors.items():
            t.copy_(start[n])
        step(k)
        moved = torch.cat([(t.double() - start[n].double()).flatten() for n, t in tensors.items()])
        total = moved if total is None else total + moved
    for n, t in tensors.items():
        t.copy_(start[n])
    return total / steps
