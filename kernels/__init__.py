"""``sglang_mezo.kernels``: the random direction z, regenerated from a seed and applied to weights in place.

The leaves of the project: no SGLang, no HTTP, no training logic. Triton on CUDA tensors, PyTorch on CPU
tensors, the same stream on both (see :mod:`.stream` for its versioned definition).
"""

from .ops import PassTargets, ZTarget, as_block, materialize_z, zaxpy_
from .stream import GENERATOR_VERSION, MAX_SEED, ZKind, ZSlice, check_seed, derive_seed, tensor_key

__all__ = [
    "GENERATOR_VERSION",
    "MAX_SEED",
    "PassTargets",
    "ZKind",
    "ZSlice",
    "ZTarget",
    "as_block",
    "check_seed",
    "derive_seed",
    "materialize_z",
    "tensor_key",
    "zaxpy_",
]
