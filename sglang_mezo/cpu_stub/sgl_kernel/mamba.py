"""Import-only names of ``sgl_kernel.mamba`` (linear-attention models are not served by the CPU stand-in)."""

from . import _unavailable

causal_conv1d_fn_cpu = _unavailable("mamba.causal_conv1d_fn_cpu")
causal_conv1d_update_cpu = _unavailable("mamba.causal_conv1d_update_cpu")
chunk_gated_delta_rule_cpu = _unavailable("mamba.chunk_gated_delta_rule_cpu")
