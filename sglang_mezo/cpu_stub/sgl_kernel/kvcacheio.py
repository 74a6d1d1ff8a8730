"""``sgl_kernel.kvcacheio``: the host KV cache's transfer ops, which SGLang imports on CUDA (mem_cache/
memory_pool_host.py, pool_host/*.py, hisparse_memory_pool.py) and calls only with a hierarchical cache, which a
server on the stand-in does not use."""

from . import _unavailable

NAMES = ("transfer_kv_all_layer", "transfer_kv_all_layer_direct_lf_pf", "transfer_kv_all_layer_lf_pf",
         "transfer_kv_all_layer_lf_ph", "transfer_kv_all_layer_mla", "transfer_kv_all_layer_mla_lf_pf",
         "transfer_kv_direct", "transfer_kv_per_layer", "transfer_kv_per_layer_direct_pf_lf",
         "transfer_kv_per_layer_mla", "transfer_kv_per_layer_mla_pf_lf", "transfer_kv_per_layer_pf_lf",
         "transfer_kv_per_layer_ph_lf")
globals().update({name: _unavailable(f"kvcacheio.{name}") for name in NAMES})
