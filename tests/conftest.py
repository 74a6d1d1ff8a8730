"""Test-session set-up.

Without CUDA, the Triton kernels are tested under Triton's interpreter, which Triton selects when a kernel is
*decorated*: the variable must be set before ``sglang_mezo.kernels.z_triton`` is first imported, hence here.
On a GPU machine the real kernels are compiled and tested on CUDA tensors instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory) -> str:
    """The embedded default model, converted once per test session into a temporary cache."""
    from sglang_mezo.default_model import default_model_path

    return str(default_model_path(tmp_path_factory.mktemp("smollm2-cache")))
