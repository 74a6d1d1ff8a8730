"""A pure-PyTorch stand-in for the ``sgl_kernel`` wheel, for serving SGLang on a machine without CUDA.

The PyPI ``sgl_kernel`` wheel is CUDA-only: it fails to import without ``libcuda``, while SGLang's CPU path imports
a few names from it when its modules load. The folder that holds this package's ``sgl_kernel/`` is put first on the
``PYTHONPATH`` of a server process (by ``sglang-mezo serve`` and the tests, and only when no CUDA device is present;
see :func:`stub_path`). Nothing is patched at import time.

Deliberately absent: ``torch.ops.sgl_kernel.convert_weight_packed``. On a CPU with AMX, its presence switches SGLang
to kernels that read a packed copy of the weights, which an in-place MeZO perturbation of the parameters would
never reach.
"""

from pathlib import Path


def stub_path() -> str:
    """The directory to prepend to ``PYTHONPATH`` so that ``import sgl_kernel`` finds the stand-in."""
    return str(Path(__file__).resolve().parent)
