"""``sgl_kernel.quantization``: the GGUF kernels SGLang imports on CUDA (layers/quantization/gguf.py) and calls only
for GGUF-quantized weights."""

from . import _unavailable

NAMES = ("ggml_dequantize", "ggml_moe_a8", "ggml_mul_mat_a8", "ggml_mul_mat_vec_a8")
globals().update({name: _unavailable(f"quantization.{name}") for name in NAMES})
