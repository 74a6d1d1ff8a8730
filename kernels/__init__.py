"""``sglang_mezo.kernels``: the random direction z, regenerated from a seed and applied to weights in place.

The leaves of the project: no SGLang, no HTTP, no training logic. Triton on CUDA tensors, PyTorch on CPU
tensors, the same stream on both (see :mod:`.stream` for its versioned definition).
"""

from .ops import PassTargets, ZTarget, as_block, materialize_z, zaxpy_
from .stream import (
    GENERATOR_VERSION,
    MAX_SEED,
    READABLE,
    ZKind,
    ZSlice,
    check_seed,
    derive_seed,
    stream_version,
    tensor_key,
)
from .z_lowrank import MAX_RANK, check_rank

__all__ = [
    "GENERATOR_VERSION",
    "MAX_RANK",
    "MAX_SEED",
    "READABLE",
    "PassTargets",
    "ZKind",
    "ZSlice",
    "ZTarget",
    "as_block",
    "check_rank",
    "check_seed",
    "derive_seed",
    "materialize_z",
    "stream_version",
    "tensor_key",
    "zaxpy_",
]
