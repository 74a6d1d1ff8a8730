"""Stand-in ``sgl_kernel`` (see ``sglang_mezo.cpu_stub``): the CPU ops SGLang's serving path uses, in PyTorch.

Names that SGLang only imports (speculative decoding, mamba) exist so that its modules load; calling one raises
an error that says so instead of computing something wrong.
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


def _unavailable(name: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not provided by sglang-mezo's CPU stand-in (the feature that calls it, such as "
            "speculative decoding or KV-cache relocation, is not supported on CPU)"
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
