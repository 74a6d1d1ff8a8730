"""The MeZO step on small tensors where the answer is known: SPSA on a quadratic, n probes, weight decay masks,
failure safety, parameter selection and schedules."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_mezo.core.params import ParamSelection, TrainablePiece, TrainableSet
from sglang_mezo.core.schedules import LRSchedule, lr_at
from sglang_mezo.core.spsa import NonFiniteLossError, mezo_step
from sglang_mezo.kernels import ZKind, ZSlice, materialize_z, tensor_key


def make_set(*shapes_by_name: tuple[str, tuple[int, ...]], seed: int = 0) -> tuple[TrainableSet, dict]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=gen) * 0.1 for name, shape in shapes_by_name}
    pieces = [TrainablePiece(name, t, tuple(t.shape)) for name, t in tensors.items()]
    return TrainableSet.from_pieces(pieces), tensors


def z_of(name: str, t: torch.Tensor, seed: int, kind: ZKind) -> torch.Tensor:
    cols = t.shape[-1]
    return materialize_z(seed, ZSlice(tensor_key(name), cols), (t.numel() // cols, cols), kind).view(t.shape)


@pytest.mark.parametrize("kind", list(ZKind))
@pytest.mark.parametrize("n_probes", [1, 3])
def test_spsa_on_a_quadratic(kind, n_probes):
    """L = ½‖θ‖²: the two-sided difference is exact, g_k = <z_k, θ>, and the update is θ - lr/n Σ g_k z_k."""
    params, tensors = make_set(("a.weight", (17, 9)), ("b.bias", (9,)))
    before = {n: t.clone() for n, t in tensors.items()}

    def loss() -> float:
        return 0.5 * sum(float((t.double() ** 2).sum()) for t in tensors.values())

    seeds = [101 + k for k in range(n_probes)]
    lr, eps = 0.05, 1e-3
    result = mezo_step(params, loss, seeds, eps=eps, lr=lr, kind=kind)

    expected_update = {n: torch.zeros_like(t) for n, t in before.items()}
    for seed, g in zip(seeds, result.projected_grads, strict=True):
        zs = {n: z_of(n, t, seed, kind) for n, t in before.items()}
        exact_g = sum(float((zs[n].double() * before[n].double()).sum()) for n in before)
        assert g == pytest.approx(exact_g, rel=1e-3, abs=1e-4)
        for n in before:
            expected_update[n] -= lr / n_probes * g * zs[n]
    for n, t in tensors.items():
        torch.testing.assert_close(t, before[n] + expected_update[n], atol=1e-6, rtol=0)
    assert len(result.loss_plus) == len(result.loss_minus) == n_probes
    assert result.lr == lr and result.seeds == tuple(seeds)


def test_lr_zero_leaves_weights_at_round_trip_tolerance():
    params, tensors = make_set(("w.weight", (64, 33)))
    before = tensors["w.weight"].clone()
    calls = []
    for step in range(20):
        mezo_step(params, lambda: calls.append(1) or float(tensors["w.weight"].sum()), [step], eps=1e-3, lr=0.0)
    assert len(calls) == 40
    scale = before.abs().max().item()
    assert (tensors["w.weight"] - before).abs().max().item() <= 1e-6 * scale


def test_weight_decay_skips_biases_and_norms():
    params, tensors = make_set(
        ("model.layers.0.mlp.up_proj.weight", (8, 4)),
        ("model.layers.0.mlp.up_proj.bias", (8,)),
        ("model.layers.0.input_layernorm.weight", (4,)),
    )
    before = {n: t.clone() for n, t in tensors.items()}
    lr, wd = 0.1, 0.5
    mezo_step(params, lambda: 1.0, [3], eps=1e-3, lr=lr, weight_decay=wd)  # constant loss: g = 0, only decay
    torch.testing.assert_close(tensors["model.layers.0.mlp.up_proj.weight"],
                               before["model.layers.0.mlp.up_proj.weight"] * (1 - lr * wd), atol=1e-6, rtol=0)
    for name in ("model.layers.0.mlp.up_proj.bias", "model.layers.0.input_layernorm.weight"):
        torch.testing.assert_close(tensors[name], before[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_failure_mid_step_leaves_committed_weights(fail_at):
    """An exception from the scorer while perturbed: the probe is taken off, nothing is applied."""
    params, tensors = make_set(("w.weight", (32, 7)))
    before = tensors["w.weight"].clone()
    calls = 0

    def loss() -> float:
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise RuntimeError("scorer died")
        return float(tensors["w.weight"].sum())

    with pytest.raises(RuntimeError, match="scorer died"):
        mezo_step(params, loss, [1, 2], eps=1e-3, lr=10.0)
    assert (tensors["w.weight"] - before).abs().max().item() <= 1e-6 * before.abs().max().item()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_is_refused(bad):
    params, tensors = make_set(("w.weight", (16, 5)))
    before = tensors["w.weight"].clone()
    with pytest.raises(NonFiniteLossError):
        mezo_step(params, lambda: bad, [1], eps=1e-3, lr=1.0)
    assert (tensors["w.weight"] - before).abs().max().item() <= 1e-6 * before.abs().max().item()


@pytest.mark.parametrize("kwargs", [dict(eps=0.0, lr=1.0), dict(eps=math.nan, lr=1.0), dict(eps=1e-3, lr=-1.0),
                                    dict(eps=1e-3, lr=math.inf)])
def test_bad_hyper_parameters_are_refused_before_touching_weights(kwargs):
    params, tensors = make_set(("w.weight", (4, 4)))
    before = tensors["w.weight"].clone()
    with pytest.raises(ValueError):
        mezo_step(params, lambda: 0.0, [1], **kwargs)
    assert torch.equal(tensors["w.weight"], before)


def test_zero_gradient_probes_are_counted():
    params, _ = make_set(("w.weight", (4, 4)))
    result = mezo_step(params, lambda: 0.25, [1, 2, 3], eps=1e-3, lr=1.0)  # piecewise-constant objective
    assert result.projected_grads == (0.0, 0.0, 0.0) and result.zero_grad_probes == 3


NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.2.mlp.down_proj.weight",
    "model.norm.weight",
]


@pytest.mark.parametrize(
    "selection, expected",
    [
        (ParamSelection(), NAMES),
        (ParamSelection(last_layers=1), ["model.layers.2.mlp.down_proj.weight"]),
        (ParamSelection(last_layers=2), NAMES[3:6]),
        (ParamSelection(include=(r"q_proj",)), [NAMES[1], NAMES[3]]),
        (ParamSelection(exclude=(r"norm", r"embed")), [NAMES[1], NAMES[3], NAMES[4], NAMES[5]]),
        (ParamSelection(include=(r"mlp",), last_layers=2), NAMES[4:6]),
    ],
)
def test_parameter_selection(selection, expected):
    assert selection.select(NAMES, num_layers=3) == expected


def test_selection_errors():
    with pytest.raises(Exception):
        ParamSelection(include=("(",))
    with pytest.raises(ValueError):
        ParamSelection(last_layers=0)
    pieces = [TrainablePiece("a.weight", torch.zeros(2, 2), (2, 2))]
    with pytest.raises(ValueError, match="matches no trainable tensor"):
        TrainableSet.from_pieces(pieces, ParamSelection(include=("nothing",)))


def test_fingerprint_ignores_sharding_but_not_the_selection():
    full = torch.zeros(8, 4)
    whole = TrainableSet({"a.weight": (8, 4)}, [TrainablePiece("a.weight", full, (8, 4))])
    shard = TrainableSet({"a.weight": (8, 4)}, [TrainablePiece("a.weight", full[4:], (8, 4), row_offset=4)])
    other = TrainableSet({"b.weight": (8, 4)}, [TrainablePiece("b.weight", full, (8, 4))])
    assert whole.fingerprint() == shard.fingerprint() != other.fingerprint()


def test_schedules():
    kw = dict(lr=1.0, total_steps=11, warmup_steps=0)
    assert [lr_at(s, schedule=LRSchedule.CONSTANT, **kw) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
    assert [lr_at(s, schedule=LRSchedule.LINEAR, **kw) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert [lr_at(s, schedule=LRSchedule.COSINE, **kw) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    warm = [lr_at(s, lr=1.0, schedule=LRSchedule.COSINE, total_steps=14, warmup_steps=4) for s in range(14)]
    assert warm[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and warm[-1] == pytest.approx(0.0)
    assert lr_at(10, lr=1.0, schedule=LRSchedule.LINEAR, total_steps=11, min_lr_ratio=0.1) == pytest.approx(0.1)


def _partial_pass_after(first_targets: int, on_call: int, action):
    """A zaxpy_ stand-in for one pass that applies the real op to the first targets, then calls ``action``."""
    from sglang_mezo.kernels import zaxpy_ as real

    calls = 0

    def wrapper(targets, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls != on_call:
            return real(targets, *args, **kwargs)
        real(targets[:first_targets], *args, **kwargs)
        action()
        return real(targets[first_targets:], *args, **kwargs)

    return wrapper


def test_ctrl_c_during_a_pass_is_held_until_the_pass_is_recorded(monkeypatch):
    """SIGINT arriving between two tensors of the -2ε pass: the pass completes, then the probe is taken off."""
    import os
    import signal

    import sglang_mezo.core.params as params_module
    import sglang_mezo.core.spsa as spsa

    params, tensors = make_set(("a.weight", (16, 8)), ("b.weight", (16, 8)))
    before = {n: t.clone() for n, t in tensors.items()}
    monkeypatch.setattr(params_module, "zaxpy_", _partial_pass_after(1, 2, lambda: os.kill(os.getpid(), signal.SIGINT)))
    # Python's own Ctrl-C handler, whatever an earlier test in this process left installed: once, in a full-suite
    # run (2026-11-30), no KeyboardInterrupt came here although the test passes alone and after every non-server
    # test; a handler left behind by an earlier test is the likely cause (not confirmed)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            spsa.mezo_step(params, lambda: float(sum(t.sum() for t in tensors.values())), [1], eps=1e-3, lr=1.0)
    finally:
        signal.signal(signal.SIGINT, previous)
    for name, t in tensors.items():
        assert (t - before[name]).abs().max().item() <= 1e-6 * before[name].abs().max().item(), name


def test_a_pass_failing_part_way_is_reported_not_papered_over(monkeypatch):
    import sglang_mezo.core.params as params_module
    import sglang_mezo.core.spsa as spsa

    params, tensors = make_set(("a.weight", (16, 8)), ("b.weight", (16, 8)))

    def boom():
        raise MemoryError("tile allocation failed")

    monkeypatch.setattr(params_module, "zaxpy_", _partial_pass_after(1, 2, boom))
    with pytest.raises(spsa.InconsistentWeightsError) as info:
        spsa.mezo_step(params, lambda: 0.0, [1], eps=1e-3, lr=1.0)
    assert isinstance(info.value.__cause__, MemoryError)
