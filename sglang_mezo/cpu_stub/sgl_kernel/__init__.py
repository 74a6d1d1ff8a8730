"""Stand-in ``sgl_kernel`` (see ``sglang_mezo.cpu_stub``): the CPU ops SGLang's serving path uses, in PyTorch.

Names that SGLang only imports exist so that its modules load: speculative decoding and mamba on a CPU, and on
CUDA the layer, sampler, quantization and host-KV-cache ops it imports at module load. Calling one raises
:class:`StandInUnavailable`, a ``RuntimeError``: not ``NotImplementedError``, which SGLang's fused-op dispatcher
catches under a forced backend and answers by falling back to the CUDA path it was told not to take.

On CUDA without the real wheel (``benchmarks/gpu_server_check.sh``), serve with ``SGLANG_FORCE_FUSED_OP_BACKEND=torch``
and the torch-native attention and sampling backends: then none of these is called for a Llama (every fused op
runs its ``forward_native``; the pytorch sampler and the KV store use no ``sgl_kernel`` op). Deliberately absent:
``sgl_kernel.allreduce`` (without it SGLang turns its custom all-reduce off; with it, TP > 1 would call it) and
``sgl_kernel.scalar_type`` (SGLang has a fallback for it).
"""

from __future__ import annotations

import torch

__version__ = "0.0.0+sglang-mezo-cpu-stub"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's new KV slots into its row of the request -> token table.

    Request i gets ``out_cache_loc[o_i : o_i + (end_i - start_i)]`` at ``req_to_token[req_pool_indices[i],
    start_i:end_i]``, with ``o_i`` the sum of the previous requests' lengths (SGLang's Triton kernel
    ``assign_req_to_token_pool``, sequentially).
    """
    del pool_len  # the row length; implied by req_to_token's shape
    offset = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


class StandInUnavailable(RuntimeError):
    """An op of the real ``sgl_kernel`` that the stand-in only names."""


def _unavailable(name: str):
    def fail(*args, **kwargs):
        raise StandInUnavailable(
            f"sgl_kernel.{name} is not provided by sglang-mezo's sgl_kernel stand-in (the feature that calls it "
            "is not supported where the real wheel cannot load: see sglang_mezo/cpu_stub/sgl_kernel/__init__.py)"
        )

    fail.__name__ = name
    return fail


copy_all_layer_kv_cache_cpu = _unavailable("copy_all_layer_kv_cache_cpu")
build_tree_kernel_efficient_cpu = _unavailable("build_tree_kernel_efficient_cpu")
verify_tree_greedy_cpu = _unavailable("verify_tree_greedy_cpu")
build_draft_decode_metadata_cpu = _unavailable("build_draft_decode_metadata_cpu")
assign_draft_cache_locs_contiguous_cpu = _unavailable("assign_draft_cache_locs_contiguous_cpu")
assign_extend_cache_locs_cpu = _unavailable("assign_extend_cache_locs_cpu")
fill_accept_out_cache_loc_cpu = _unavailable("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _unavailable("fill_bonus_tokens_cpu")
rotate_input_ids_cpu = _unavailable("rotate_input_ids_cpu")

# What SGLang 0.5.23 imports from sgl_kernel at module load when it sees CUDA (layers/layernorm.py, activation.py,
# sampler.py, quantization/w8a8_int8.py, compressed_tensors_w8a8_int8.py, gguf.py, moe/.../fused_moe.py); found by
# importing its serving modules under a faked CUDA with only this stand-in (tests/test_sgl_kernel_standin.py).
CUDA_IMPORTED = ("rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm", "silu_and_mul",
                 "gelu_and_mul", "gelu_tanh_and_mul", "top_k_renorm_prob", "top_p_renorm_prob", "int8_scaled_mm",
                 "moe_sum", "moe_sum_reduce")
globals().update({name: _unavailable(name) for name in CUDA_IMPORTED})
