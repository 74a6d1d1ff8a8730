"""The random direction z: its definition, versioned.

A MeZO fine-tune is stored as "base weights + a list of (seed, projected gradient, ...)". That list is only
worth something if z can be regenerated bit for bit, on another machine, another Triton, another TP degree,
years later. So the stream is *ours*, spelled out here, and never delegated to ``tl.randn`` (whose output
has changed between Triton releases) or to the torch RNG (which also drives sampling in the server).

Stream version 1 — z(seed, key, i) for element i (row-major index in the full, unsharded tensor):

* Philox4x32-10 (Salmon et al., SC'11; the Random123 constants), key = (seed lo32, seed hi32),
  counter = (group lo32, group hi32, key lo32, key hi32), where ``key`` is the tensor's 63-bit identity
  (:func:`tensor_key`, a hash of its checkpoint name) and ``group`` depends on the kind:
* ``gaussian``: group = i >> 2, lane = i & 3. Each counter gives four uint32 words w0..w3, read as uniforms
  u = (w + 0.5) · 2^-32 (exact in float64, never 0 or 1), and two Box–Muller pairs: lanes 0 and 1 are
  r·cos(φ) and r·sin(φ) with r = sqrt(-2 ln u0) and φ = 2π·u1; lanes 2 and 3 the same from (u2, u3). The
  transform is evaluated in float64 and rounded once to float32.
* ``rademacher``: group = i >> 7; bit (i & 31) of word ((i >> 5) & 3); z = +1 when the bit is 0, else -1.
  One Philox call yields 128 signs, which is what makes it cheap on a CPU.

Stream version 2 adds, without changing anything above, the *low-rank* direction of a matrix (``rank`` r >= 1):
z = U·Vᵀ/√r with factors drawn from two version-1 streams of the same kind, defined in :mod:`.z_lowrank`. A run
whose z is dense needs version 1 only, and is recorded so (:func:`stream_version`).

Why float64 for Box–Muller: float32 log/cos/sin differ by up to 4 ulp between libraries (numpy, which the Triton
interpreter uses, against torch's), so an fp32 transform cannot give the same normals everywhere. Evaluated in
float64 and rounded once, every implementation returns the correctly rounded value, bit for bit, except when
the float64 result lies within an ulp of a float32 rounding boundary (about one element in 2^29), where they
may differ by one float32 ulp. The integer stream is exact everywhere.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

GENERATOR_VERSION = 2
"""Bump whenever anything in the definition above changes; trajectories record the version they need and replay
refuses a later one. Versions only ever add: every version this build knows replays (:data:`READABLE`)."""
READABLE = (1, 2)


def stream_version(rank: int) -> int:
    """The stream version a run needs: 1 for dense z, 2 for low-rank z."""
    return 2 if rank else 1

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

MASK32 = 0xFFFFFFFF
MAX_SEED = (1 << 63) - 1
"""Seeds and tensor keys are non-negative int64 so that they travel as plain int64 tensors and JSON ints."""

TWO_PI = 6.283185307179586  # float64(2π), spelled out so every implementation multiplies by the same value
UNIFORM_SCALE = 2.0**-32


class ZKind(str, enum.Enum):
    """Distribution of the direction z."""

    GAUSSIAN = "gaussian"
    """N(0, 1) per element; the MeZO paper's choice. ~4 elements per Philox call plus a log and a sin/cos."""
    RADEMACHER = "rademacher"
    """±1 per element; 128 elements per Philox call and exactly representable in every dtype."""

    @property
    def code(self) -> int:
        """Small integer passed to kernels as a compile-time constant."""
        return 0 if self is ZKind.GAUSSIAN else 1


def tensor_key(name: str) -> int:
    """The stable 63-bit identity of a full tensor, derived from its checkpoint name.

    A name, not an iteration index: every TP rank, a CPU replay and the plain transformers checkpoint see the
    same key for the same tensor, whatever order they hold their parameters in.
    """
    return hash63(name)


def hash63(text: str) -> int:
    """A stable 63-bit number from a string: BLAKE2b, 8 bytes little-endian, the top bit cleared. Tensor keys,
    derived seeds and low-rank factor keys are all made so."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MAX_SEED


def check_seed(seed: int) -> int:
    """Validate a seed (the user-facing range is [0, 2^63 - 1]) and return it as a Python int."""
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
    return seed


def derive_seed(job_seed: int, step: int, probe: int) -> int:
    """The seed of probe ``probe`` at step ``step`` of a job seeded ``job_seed``: a pure function, no RNG state.

    Resuming a job at step k therefore needs nothing but the job seed; and the server's sampling RNG is
    never touched.
    """
    return hash63(f"{check_seed(job_seed)}:{int(step)}:{int(probe)}")


@dataclass(frozen=True)
class ZSlice:
    """Where a 2-D block of local storage sits inside its full (unsharded) tensor, which is what z is keyed by.

    The full tensor is viewed as ``[numel // full_cols, full_cols]`` (a 1-D tensor as ``[1, n]``); local element
    (r, c) is full element (row_offset + r, col_offset + c). A column-parallel TP shard has a ``row_offset``,
    a row-parallel one a ``col_offset``, the whole tensor neither.
    """

    key: int
    full_cols: int
    row_offset: int = 0
    col_offset: int = 0
