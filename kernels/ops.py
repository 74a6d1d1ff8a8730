"""Launchers: apply Σ c·z(seed) to a list of tensors in place, on CUDA (Triton) or CPU (numba for fp32, PyTorch for
the other dtypes).

One call is one *pass* over the trainable weights. A target may carry an fp32 *master* of half-precision weights:
the pass then reads the master and writes the served weights rounded from the fp32 result, and writes the master
too only when asked (a commit), so a probe never rounds the truth.

A pass is registered as a torch custom op that declares the tensors it mutates, so ``torch.compile`` is not surprised
by an in-place write.
"""

from __future__ import annotations

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
    master: torch.Tensor | None = None
    """An fp32 block of theta's shape, contiguous, that holds the weights' truth: passes read it instead of theta.
    It may live in host memory while theta is on a GPU (streamed to the device for each pass)."""


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


# A probe from a master on the CPU goes a tile of this many elements at a time through a scratch copy (1 MiB: in
# cache), so the master is read once and the served weights written once, with the compiled kernel's arithmetic.
_MASTER_TILE = 1 << 18


def _tiles(master: torch.Tensor, served: torch.Tensor, where: ZSlice):
    rows, cols = master.shape
    if rows == 1:
        for c0 in range(0, cols, _MASTER_TILE):
            c1 = min(cols, c0 + _MASTER_TILE)
            yield master[:, c0:c1], served[:, c0:c1], ZSlice(where.key, where.full_cols, where.row_offset,
                                                              where.col_offset + c0)
        return
    step = max(1, _MASTER_TILE // cols)
    for r0 in range(0, rows, step):
        yield (master[r0 : r0 + step], served[r0 : r0 + step],
               ZSlice(where.key, where.full_cols, where.row_offset + r0, where.col_offset))


def _master_pass_cpu(master: torch.Tensor, served: torch.Tensor, where: ZSlice, *, commit: bool,
                     **coefficients) -> None:
    if commit:
        # in place over the whole block, then rounded: measured faster here (1.41x an fp32 pass against 1.54x) than
        # per tile, whose kernel calls are too small to spread over the cores
        zaxpy_numba_(master, where, **coefficients)
        served.copy_(master)  # round to nearest even, as Triton's store does
        return
    for m, s, w in _tiles(master, served, where):
        scratch = m.clone()  # a probe leaves the master as it is
        zaxpy_numba_(scratch, w, **coefficients)
        s.copy_(scratch)


@torch.library.custom_op("sglang_mezo::zaxpy_", mutates_args=("thetas", "masters"))
def _zaxpy_op(
    thetas: list[torch.Tensor],
    masters: list[torch.Tensor],
    commit: bool,
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
    for i, (theta, key, fc, ro, co, decay) in enumerate(
        zip(thetas, keys, full_cols, row_offsets, col_offsets, decays, strict=True)
    ):
        where = ZSlice(key, fc, ro, co)
        master = masters[i] if masters else None
        if theta.is_cuda or force_triton:
            if theta.device not in coefficients:
                coefficients[theta.device] = (
                    torch.tensor(seeds, dtype=torch.int64, device=theta.device),
                    torch.tensor(restore, dtype=torch.float32, device=theta.device),
                    torch.tensor(update, dtype=torch.float32, device=theta.device),
                )
            if master is None:
                _zaxpy_triton_(as_block(theta), where, *coefficients[theta.device], decay=decay, kind=z_kind)
                continue
            # a master in host memory is streamed through the device, one tensor at a time
            source = master.to(theta.device, non_blocking=True)
            _zaxpy_triton_(source, where, *coefficients[theta.device], decay=decay, kind=z_kind,
                           out=as_block(theta), write_back=commit)
            if commit and source is not master:
                master.copy_(source)
        elif master is not None:
            _master_pass_cpu(master, as_block(theta), where, commit=commit, seeds=seeds, restore=restore,
                             update=update, decay=decay, kind=z_kind)
        else:
            cpu_pass = zaxpy_numba_ if theta.dtype in NUMBA_DTYPES else zaxpy_torch_
            cpu_pass(as_block(theta), where, seeds=seeds, restore=restore, update=update, decay=decay, kind=z_kind)


@_zaxpy_op.register_fake
def _(thetas, masters, commit, keys, full_cols, row_offsets, col_offsets, decays, seeds, restore, update, kind,
      force_triton) -> None:
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
    commit: bool = True,
) -> None:
    """For every target: θ ← (θ + Σ_k restore[k]·z_k)·d + Σ_k update[k]·z_k, with d = ``decay`` for targets whose
    ``decay`` flag is set and 1 otherwise. In place, fp32 math, no parameter-sized temporaries.

    Targets with a ``master`` (all of them or none): the right side reads the master for θ, the result is
    written rounded to the served ``theta``, and to the master as well only with ``commit``.

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
    masters = [t.master for t in targets if t.master is not None]
    if masters and len(masters) != len(targets):
        raise ValueError("a pass takes targets that all have a master, or none that has")
    _zaxpy_op(
        [t.theta for t in targets],
        masters,
        commit,
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


# Elements a program covers, at most: the interpreter pays per program, not per element, so large tiles there; on a
# GPU 1024 (8 Rademacher groups or 256 Gaussian ones over 4 warps: 8 elements a thread).
_GPU_TILE = 1 << 10
_INTERPRETER_TILE = 1 << 16


@dataclass(frozen=True)
class TritonLaunch:
    """One launch of :func:`.z_triton.zaxpy_kernel`: its grid, its arguments in the kernel's order and its
    compile-time constants. Built by :func:`plan_triton_pass`; the CUDA compile test compiles exactly these."""

    grid: tuple[int]
    args: tuple
    constexprs: dict[str, int | bool]
    options: dict[str, int | bool]


def plan_triton_pass(
    block: torch.Tensor,
    where: ZSlice,
    seeds_t: torch.Tensor,
    restore_t: torch.Tensor,
    update_t: torch.Tensor,
    *,
    decay: float,
    kind: ZKind,
    out: torch.Tensor | None = None,
    write_back: bool = True,
    interpret: bool = False,
) -> TritonLaunch | None:
    """How to run one pass over a 2-D ``block`` (None: nothing to do). Programs cover whole Philox groups of one row
    (see :mod:`.z_triton`): as many per row as the longest row's groups need, as few groups each as a short row
    needs."""
    rows, cols = block.shape
    if rows * cols == 0:
        return None
    first_index = where.row_offset * where.full_cols + where.col_offset
    index_row_stride = where.full_cols
    row_stride = block.stride(0)
    out_row_stride = row_stride if out is None else out.stride(0)
    # whole rows, stored contiguously (served and master alike): one run of indices, so that no Philox group is
    # made twice and every program is full
    if (cols == where.full_cols and where.col_offset == 0 and block.is_contiguous()
            and (out is None or out.is_contiguous())):
        rows, cols = 1, rows * cols
        index_row_stride = row_stride = out_row_stride = cols
    log2 = 2 if kind is ZKind.GAUSSIAN else 7
    per_group = 1 << log2
    aligned = first_index % per_group == 0 and (rows == 1 or index_row_stride % per_group == 0)
    # groups one row touches, at most (an unaligned row may straddle one group more)
    row_groups = -(-(cols + (0 if aligned else per_group - 1)) // per_group)
    max_groups = (_INTERPRETER_TILE if interpret else _GPU_TILE) // per_group
    groups = min(max_groups, 1 << (row_groups - 1).bit_length())
    programs_per_row = -(-row_groups // groups)
    return TritonLaunch(
        grid=(rows * programs_per_row,),
        args=(block, block if out is None else out, row_stride, out_row_stride, cols, first_index,
              index_row_stride, programs_per_row, where.key, seeds_t, restore_t, update_t, seeds_t.numel(),
              float(decay)),
        constexprs={"KIND": kind.code, "GROUPS": groups, "ALIGNED": aligned, "HAS_OUT": out is not None,
                    "WRITE_BACK": write_back},
        # no FMA contraction: the same roundings as the CPU paths, so they agree bit for bit
        options={"num_warps": 4, "enable_fp_fusion": False},
    )


def _interpreted(kernel) -> bool:
    """Whether Triton decorated ``kernel`` for its interpreter (TRITON_INTERPRET=1 when the module was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def _zaxpy_triton_(
    block: torch.Tensor,
    where: ZSlice,
    seeds_t: torch.Tensor,
    restore_t: torch.Tensor,
    update_t: torch.Tensor,
    *,
    decay: float,
    kind: ZKind,
    out: torch.Tensor | None = None,
    write_back: bool = True,
) -> None:
    from .z_triton import zaxpy_kernel

    launch = plan_triton_pass(block, where, seeds_t, restore_t, update_t, decay=decay, kind=kind, out=out,
                              write_back=write_back, interpret=_interpreted(zaxpy_kernel))
    if launch is not None:
        zaxpy_kernel[launch.grid](*launch.args, **launch.constexprs, **launch.options)
