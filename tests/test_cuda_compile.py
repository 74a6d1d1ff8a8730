"""The Triton kernels compiled for CUDA (sm_90, and sm_80) on this CPU machine, with no GPU and no driver.

Triton's interpreter runs the kernels' arithmetic on a CPU, but not what a GPU compile does with their arguments:
an integer argument equal to 1 becomes a compile-time constant, one divisible by 16 an alignment hint, one of 2^31
or more an int64 (triton-lang/triton#2939). The first run on an H200 crashed there, at the first one-row block
(the kernel then took each block's sizes as integer arguments; they now come from a table).
So ``tests/cuda_compile.py`` records the launches the real launcher makes (its kernel swapped for a recorder),
specialises each with Triton's own binder exactly as a launch on a GPU would, and compiles every distinct
specialisation to a cubin with the ptxas inside Triton's wheel. These tests check that its cases cover what the
launcher can produce, and read the PTX: Philox calls and Box–Muller transforms per element, and one read and one
write of each weight however many seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).parents[1]
FULL_TILE = 1024


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_compile.py")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    if not result["available"]:
        # a future Triton that needs a driver to compile: loud, and a skip, not a pass
        pytest.skip(f"THIS TRITON ({result['triton']}) CANNOT COMPILE FOR CUDA WITHOUT A DRIVER: the kernels' CUDA "
                    f"compile is untested here ({result['reason']})")
    return result["launches"]


def sm90(compiled: list[dict]) -> list[dict]:
    return [launch for launch in compiled if launch["arch"] == 90]


def test_the_cases_cover_every_integer_argument_at_1_at_a_multiple_of_16_and_otherwise(compiled):
    """The seed count is the kernel's one integer argument (the blocks' integers are read from their table at run
    time, where no specialisation reaches them); the launches cover every dtype mode, tile size and path."""
    launches = sm90(compiled)
    seeds = {launch["n_seeds"] for launch in launches}
    assert 1 in seeds and any(v % 16 == 0 for v in seeds) and any(v % 16 and v != 1 for v in seeds), seeds
    assert any(launch["blocks"] > 1 for launch in launches)
    modes = {(launch["constexprs"]["KIND"], launch["theta_dtype"], launch["out_dtype"],
              launch["constexprs"]["WRITE_BACK"]) for launch in launches}
    for kind in (0, 1):
        for dtype in ("torch.float32", "torch.bfloat16", "torch.float16"):
            assert (kind, dtype, dtype, True) in modes
        for dtype in ("torch.bfloat16", "torch.float16"):
            assert {(kind, "torch.float32", dtype, False), (kind, "torch.float32", dtype, True)} <= modes
        # an adapter's probe written from its fp32 master into an fp32 LoRA pool's slot (scheduler.adapters)
        assert (kind, "torch.float32", "torch.float32", False) in modes
    tiles = {(launch["constexprs"]["KIND"], launch["constexprs"]["GROUPS"], launch["constexprs"]["VECTOR"])
             for launch in launches}
    assert {g for k, g, _ in tiles if k == 0} == {1 << i for i in range(9)}  # Gaussian: up to 256 groups of 4
    assert {g for k, g, _ in tiles if k == 1} == {1, 2, 4, 8}  # Rademacher: up to 8 groups of 128
    assert {a for _, _, a in tiles} == {True, False}


def test_every_launch_compiled_to_a_cubin_for_sm_90_and_each_mode_for_sm_80(compiled):
    assert all(launch["cubin_bytes"] > 0 for launch in compiled)
    modes_80 = {(launch["constexprs"]["KIND"], launch["theta_dtype"], launch["out_dtype"],
                 launch["constexprs"]["WRITE_BACK"]) for launch in compiled if launch["arch"] == 80}
    assert len(modes_80) == 16  # 3 in place, 4 behind a half master, 1 probe into an fp32 slot; per z kind


def full_tiles(compiled: list[dict]) -> list[dict]:
    return [launch for launch in sm90(compiled)
            if launch["constexprs"]["GROUPS"] * (4 if launch["constexprs"]["KIND"] == 0 else 128) == FULL_TILE]


def test_a_thread_makes_one_philox_call_per_group_not_per_element(compiled):
    """Philox4x32-10 is 10 rounds of two 32-bit high multiplies. A thread of a full tile holds 1024 / 128 = 8
    elements: two Gaussian groups, or 8 of a Rademacher group's 128 elements over at most two groups. It must make
    at most two calls a seed (the kernel before made eight: one per element), and for Gaussian z one log, one sqrt
    and one division per pair of elements. With several seeds the seed loop's body appears once in the PTX (a
    loop, not unrolled), so its counts are per seed too: a layout that spread a thread over more groups inside the
    loop (as Triton's default for the first tile shape did) fails here."""
    checked = set()
    for launch in full_tiles(compiled):
        elements = FULL_TILE // launch["threads"]
        assert launch["mul_hi"] / 20 <= elements / 4, launch
        if launch["constexprs"]["KIND"] == 0:
            assert launch["sqrt"] <= elements / 2 and launch["div"] <= elements / 2, launch
        checked.add((launch["constexprs"]["KIND"], launch["constexprs"]["HAS_OUT"], launch["n_seeds"] > 1))
    # in place and through masters, one seed and several, both kinds
    assert checked == {(k, m, s) for k in (0, 1) for m in (False, True) for s in (False, True)}


def test_a_pass_reads_and_writes_each_weight_once_however_many_seeds(compiled):
    """The masked global accesses of a thread are its weights': one read of theta, one write of theta and/or of
    the served copy, for one seed and for several. Aligned fp32 blocks in place move 16 bytes an access."""
    seed_counts = set()
    for launch in full_tiles(compiled):
        elements = FULL_TILE // launch["threads"]
        c = launch["constexprs"]
        assert launch["weight_bytes_loaded"] == elements * launch["theta_bytes"], launch
        written = elements * (launch["theta_bytes"] * c["WRITE_BACK"] + launch["out_bytes"] * c["HAS_OUT"])
        assert launch["weight_bytes_stored"] == written, launch
        if c["VECTOR"] and launch["theta_dtype"] == "torch.float32" and not c["HAS_OUT"]:
            assert launch["vector_load"] and launch["vector_store"], launch
        seed_counts.add(launch["n_seeds"] > 1)
    assert seed_counts == {False, True}
