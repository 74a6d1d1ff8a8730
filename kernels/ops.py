"""Launchers: apply Σ c·z(seed) to a list of tensors in place, on CUDA (Triton) or CPU (numba for fp32, PyTorch for
the other dtypes).

One call is one *pass* over the trainable weights. It is registered as a torch custom op that declares the
tensors it mutates, so ``torch.compile`` is not surprised by an in-place write.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .stream import ZKind, ZSlice, check_seed
from .z_numba import SUPPORTED as NUMBA_DTYPES
from .z_numba import zaxpy_numba_
from .z_torch import zaxpy_torch_


@dataclass(frozen=True)
class ZTarget:
    """One block of weights to perturb or update: the storage, its place in the full tensor, its weight decay flag."""

    theta: torch.Tensor
    where: ZSlice
    decay: bool = True


def as_block(t: torch.Tensor) -> torch.Tensor:
    """View a tensor as the 2-D block the kernels expect ([1, n] for 1-D, leading dims flattened otherwise)."""
    if t.numel() == 0:  # e.g. a TP shard made only of padding: nothing to move
        return t.new_empty((0, 1))
    if t.dim() == 0:
        return t.view(1, 1)
    if t.dim() == 1:
        if t.numel() > 1 and t.stride(0) != 1:
            raise ValueError("trainable tensors must be views with unit stride along the last dimension")
        return t.view(1, -1)
    block = t.reshape(-1, t.shape[-1])
    if block.data_ptr() != t.data_ptr() or (block.numel() and block.stride(-1) != 1):
        raise ValueError("trainable tensors must be views with unit stride along the last dimension")
    return block


@torch.library.custom_op("sglang_mezo::zaxpy_", mutates_args=("thetas",))
def _zaxpy_op(
    thetas: list[torch.Tensor],
    keys: list[int],
    full_cols: list[int],
    row_offsets: list[int],
    col_offsets: list[int],
    decays: list[float],
    seeds: list[int],
    restore: list[float],
    update: list[float],
    kind: int,
    force_triton: bool,
) -> None:
    z_kind = ZKind.GAUSSIAN if kind == 0 else ZKind.RADEMACHER
    coefficients: dict[torch.device, tuple[torch.Tensor, ...]] = {}  # per device, built once per pass
    for theta, key, fc, ro, co, decay in zip(thetas, keys, full_cols, row_offsets, col_offsets, decays, strict=True):
        where = ZSlice(key, fc, ro, co)
        if theta.is_cuda or force_triton:
            if theta.device not in coefficients:
                coefficients[theta.device] = (
                    torch.tensor(seeds, dtype=torch.int64, device=theta.device),
                    torch.tensor(restore, dtype=torch.float32, device=theta.device),
                    torch.tensor(update, dtype=torch.float32, device=theta.device),
                )
            _zaxpy_triton_(as_block(theta), where, *coefficients[theta.device], decay=decay, kind=z_kind)
        else:
            cpu_pass = zaxpy_numba_ if theta.dtype in NUMBA_DTYPES else zaxpy_torch_
            cpu_pass(as_block(theta), where, seeds=seeds, restore=restore, update=update, decay=decay, kind=z_kind)


@_zaxpy_op.register_fake
def _(thetas, keys, full_cols, row_offsets, col_offsets, decays, seeds, restore, update, kind, force_triton) -> None:
    return None


def zaxpy_(
    targets: Sequence[ZTarget],
    seeds: Sequence[int],
    restore: Sequence[float],
    update: Sequence[float] | None = None,
    *,
    decay: float = 1.0,
    kind: ZKind = ZKind.GAUSSIAN,
    force_triton: bool = False,
) -> None:
    """For every target: θ ← (θ + Σ_k restore[k]·z_k)·d + Σ_k update[k]·z_k, with d = ``decay`` for targets whose
    ``decay`` flag is set and 1 otherwise. In place, fp32 math, no parameter-sized temporaries.

    A perturbation is ``restore=[ε]``; MeZO's last pass of a step, "undo the probe and apply the update" in one
    read and one write of the weights, is ``restore=[0, …, ε]``, ``update=[-lr·g_k/n …]``, ``decay=1-lr·wd``.
    ``force_triton`` runs the Triton kernel on CPU tensors too (under ``TRITON_INTERPRET=1``; for tests).
    """
    if not seeds:
        return
    seeds = [check_seed(s) for s in seeds]
    update = [0.0] * len(seeds) if update is None else list(update)
    if not len(restore) == len(update) == len(seeds):
        raise ValueError("seeds, restore and update must have the same length")
    if not targets:
        return
    _zaxpy_op(
        [t.theta for t in targets],
        [t.where.key for t in targets],
        [t.where.full_cols for t in targets],
        [t.where.row_offset for t in targets],
        [t.where.col_offset for t in targets],
        [float(decay) if t.decay else 1.0 for t in targets],
        seeds,
        [float(c) for c in restore],
        [float(c) for c in update],
        kind.code,
        force_triton,
    )


def materialize_z(
    seed: int,
    where: ZSlice,
    shape: tuple[int, int],
    kind: ZKind = ZKind.GAUSSIAN,
    *,
    device: str | torch.device = "cpu",
    force_triton: bool = False,
) -> torch.Tensor:
    """z for a block, as a new fp32 tensor (for tests and diagnostics; the training path never materialises z)."""
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    zaxpy_([ZTarget(out, where, decay=False)], [seed], [1.0], kind=kind, force_triton=force_triton)
    return out


@functools.cache
def _triton_block_size() -> int:
    # The interpreter pays per program, not per element: large blocks there; 1024 on a GPU.
    return 1 << 16 if os.environ.get("TRITON_INTERPRET") == "1" else 1024


def _zaxpy_triton_(
    block: torch.Tensor,
    where: ZSlice,
    seeds_t: torch.Tensor,
    restore_t: torch.Tensor,
    update_t: torch.Tensor,
    *,
    decay: float,
    kind: ZKind,
) -> None:
    import triton

    from .z_triton import zaxpy_kernel

    rows, cols = block.shape
    n = rows * cols
    if n == 0:
        return
    grid = (triton.cdiv(n, _triton_block_size()),)
    zaxpy_kernel[grid](
        block,
        rows,
        cols,
        block.stride(0),
        where.full_cols,
        where.row_offset,
        where.col_offset,
        where.key,
        seeds_t,
        restore_t,
        update_t,
        decay,
        N_SEEDS=seeds_t.numel(),
        KIND=kind.code,
        BLOCK=_triton_block_size(),
        num_warps=4,
        # no FMA contraction: the same roundings as the PyTorch path, so the two agree bit for bit
        enable_fp_fusion=False,
    )
