"""Import-only names of ``sgl_kernel.speculative`` (speculative decoding is not supported by the CPU stand-in)."""

from . import _unavailable

reconstruct_indices_from_tree_mask = _unavailable("speculative.reconstruct_indices_from_tree_mask")
