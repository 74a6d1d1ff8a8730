"""The z stream (version 1) pinned: Philox against published known answers and an independent pure-Python
implementation, bit for bit at edge seeds and large offsets; golden values that fail if the stream ever changes."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from sglang_mezo.kernels import GENERATOR_VERSION, READABLE, ZKind, ZSlice, materialize_z, tensor_key
from sglang_mezo.kernels.z_torch import philox4x32_10, philox_words

M32 = 0xFFFFFFFF


def philox_reference(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 in pure Python integers, written from the Random123 paper, independent of the package."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        prod0, prod1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (prod1 >> 32) ^ c1 ^ k0, prod1 & M32, (prod0 >> 32) ^ c3 ^ k1, prod0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def to_f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def z_reference(seed: int, key: int, index: int, kind: ZKind) -> float:
    """z(seed, key, index) from the written definition in kernels/stream.py, in pure Python."""
    group = index >> (2 if kind is ZKind.GAUSSIAN else 7)
    words = philox_reference((group & M32, group >> 32, key & M32, key >> 32), (seed & M32, seed >> 32))
    if kind is ZKind.RADEMACHER:
        bit = (words[(index >> 5) & 3] >> (index & 31)) & 1
        return 1.0 - 2.0 * bit
    lane = index & 3
    u_radius, u_phase = ((w + 0.5) * 2.0**-32 for w in words[2 * (lane >> 1) : 2 * (lane >> 1) + 2])
    radius = math.sqrt(-2.0 * math.log(u_radius))
    phase = 6.283185307179586 * u_phase
    return to_f32(radius * (math.cos(phase) if lane % 2 == 0 else math.sin(phase)))


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        # Random123's known-answer vectors for philox4x32-10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    assert philox_reference(counter, key) == expected
    got = philox4x32_10(*(torch.tensor([c]) for c in counter), *key)
    assert tuple(int(w) for w in got) == expected


@pytest.mark.parametrize("seed", [0, 1, M32, M32 + 1, 2**40 + 123, 2**63 - 1])
@pytest.mark.parametrize("key", [0, tensor_key("model.layers.3.mlp.down_proj.weight"), 2**63 - 1])
def test_integer_stream_bit_exact_at_edges(seed, key):
    groups = torch.tensor([0, 1, 2, M32 - 1, M32, M32 + 1, 2**40 + 7, 2**61 - 1], dtype=torch.int64)
    got = philox_words(seed, key, groups).tolist()
    for g, words in zip(groups.tolist(), got, strict=True):
        expected = philox_reference((g & M32, g >> 32, key & M32, key >> 32), (seed & M32, seed >> 32))
        assert tuple(words) == expected, f"seed={seed} key={key} group={g}"


@pytest.mark.parametrize("kind", list(ZKind))
@pytest.mark.parametrize("seed", [0, M32, 2**62 + 5])
def test_z_matches_written_definition(kind, seed):
    """Every element of a block at a large offset equals the definition evaluated one element at a time."""
    key = tensor_key("model.embed_tokens.weight")
    full_cols = 1000
    where = ZSlice(key, full_cols, row_offset=2**30, col_offset=997)  # indices beyond 2^32, unaligned start
    z = materialize_z(seed, where, (2, 3), kind)
    for r in range(2):
        for c in range(3):
            index = (2**30 + r) * full_cols + 997 + c
            assert z[r, c].item() == z_reference(seed, key, index, kind), (r, c)


def test_golden_values_version_1():
    """Literal values of stream version 1. If this fails, the stream changed: bump GENERATOR_VERSION instead, and
    keep version 1 replayable (version 2 only added the low-rank z, test_lowrank)."""
    assert GENERATOR_VERSION == 2 and 1 in READABLE
    assert tensor_key("model.embed_tokens.weight") == GOLDEN_KEY
    where = ZSlice(GOLDEN_KEY, 8)
    gaussian = materialize_z(42, where, (1, 8), ZKind.GAUSSIAN)[0].tolist()
    rademacher = materialize_z(42, where, (1, 8), ZKind.RADEMACHER)[0].tolist()
    assert gaussian == GOLDEN_GAUSSIAN
    assert rademacher == GOLDEN_RADEMACHER


def test_z_statistics():
    """The floats only statistically: mean, variance, tails, and no correlation between neighbouring tensors."""
    n = 1 << 18
    a = materialize_z(7, ZSlice(tensor_key("a"), n), (1, n), ZKind.GAUSSIAN)[0].double()
    b = materialize_z(7, ZSlice(tensor_key("b"), n), (1, n), ZKind.GAUSSIAN)[0].double()
    assert abs(a.mean()) < 5 / math.sqrt(n)
    assert abs(a.var() - 1) < 0.02
    assert abs((a.abs() > 2).double().mean() - 0.0455) < 0.003  # two-sided 2σ tail of N(0, 1)
    assert abs((a * b).mean()) < 5 / math.sqrt(n)
    r = materialize_z(7, ZSlice(tensor_key("a"), n), (1, n), ZKind.RADEMACHER)[0]
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.double().mean()) < 5 / math.sqrt(n)


def test_different_seeds_and_tensors_give_different_z():
    where = ZSlice(tensor_key("x"), 64)
    assert not torch.equal(materialize_z(1, where, (1, 64)), materialize_z(2, where, (1, 64)))
    other = ZSlice(tensor_key("y"), 64)
    assert not torch.equal(materialize_z(1, where, (1, 64)), materialize_z(1, other, (1, 64)))


GOLDEN_KEY = 8521480804469428586
GOLDEN_GAUSSIAN = [
    1.1518625020980835, 1.5297921895980835, 2.2146880626678467, -0.6336110830307007,
    -0.4437752962112427, 0.9844911694526672, 0.5338498950004578, -0.9744529128074646,
]
GOLDEN_RADEMACHER = [1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0, 1.0]
