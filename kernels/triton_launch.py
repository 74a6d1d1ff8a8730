"""The Triton pass's launcher: blocks of one pass -> a few launches of :func:`.z_triton.zaxpy_kernel`.

A pass covers every trainable tensor (201 for a 1.1B Llama). One launch per tensor would spend more host time
launching than a GPU spends on most of them, so the blocks of a pass go into one launch per kind of block (the
weights' dtype, the served copy's dtype, whether 16-byte accesses apply): a table of blocks, each addressed as an
element offset from the launch's base pointer, and a map from program to table row. Tables depend only on where
the blocks are and how they are laid out, which never changes while a server trains (no served tensor is ever
reallocated), so a trainable set keeps them, on the device, for all its passes (``ops.PassTargets``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .stream import ZKind, ZSlice

GPU_TILE = 1 << 10
"""Elements a program covers at most on a GPU: 8 Rademacher groups of 128, or 256 Gaussian groups of 4, over 4 warps
(8 elements a thread)."""
INTERPRETER_TILE = 1 << 16
"""The interpreter pays per program, not per element: large tiles there."""
VECTOR_ELEMENTS = 16
"""A block takes the 16-byte path when its offset, strides and row length are multiples of this many elements."""
FIELDS = 11  # the columns of a table row: kernels/z_triton.py (THETA_OFFSET ... DECAYED)


@dataclass(frozen=True)
class TritonBlock:
    """One block of a pass: the 2-D block the kernel reads (the weights, or their fp32 master), the served block it
    writes rounded (for a master; else None), where it sits in its full tensor, and whether weight decay applies."""

    theta: torch.Tensor
    out: torch.Tensor | None
    where: ZSlice
    decayed: bool


@dataclass(frozen=True)
class Launch:
    """One launch: its grid, the index of the block whose tensors are the base pointers, the table and program
    map (host tensors), and the compile-time constants."""

    grid: tuple[int]
    base: int
    table: torch.Tensor
    program_block: torch.Tensor
    constexprs: dict[str, int | bool]

    OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}
    """No FMA contraction: the same roundings as the CPU paths, so they agree bit for bit."""


@dataclass(frozen=True)
class _Layout:
    rows: int
    cols: int
    row_stride: int
    out_row_stride: int
    first_index: int
    index_row_stride: int
    aligned: bool  # every row starts on a Philox group
    row_groups: int  # groups a row touches, at most


def _layout(block: TritonBlock, per_group: int) -> _Layout:
    theta, out, where = block.theta, block.out, block.where
    rows, cols = theta.shape
    first_index = where.row_offset * where.full_cols + where.col_offset
    index_row_stride, row_stride = where.full_cols, theta.stride(0)
    out_row_stride = row_stride if out is None else out.stride(0)
    # whole rows, stored contiguously (weights and served copy alike): one run of indices, so that no Philox group
    # is made twice and every program is full
    if (cols == where.full_cols and where.col_offset == 0 and theta.is_contiguous()
            and (out is None or out.is_contiguous())):
        rows, cols = 1, rows * cols
        index_row_stride = row_stride = out_row_stride = cols
    aligned = first_index % per_group == 0 and (rows == 1 or index_row_stride % per_group == 0)
    row_groups = -(-(cols + (0 if aligned else per_group - 1)) // per_group)
    return _Layout(rows, cols, row_stride, out_row_stride, first_index, index_row_stride, aligned, row_groups)


def _vector(block: TritonBlock, layout: _Layout) -> bool:
    """Whether the block may take the 16-byte path: group-aligned rows, and offsets (absolute addresses at a
    multiple of 16 elements), strides and row length all multiples of 16 elements."""
    v = VECTOR_ELEMENTS
    tensors = [block.theta] + ([] if block.out is None else [block.out])
    return (layout.aligned and layout.cols % v == 0
            and all(t.data_ptr() % (v * t.element_size()) == 0 for t in tensors)
            and (layout.rows == 1 or (layout.row_stride % v == 0 and layout.out_row_stride % v == 0)))


def plan_launches(blocks: Sequence[TritonBlock], kind: ZKind, *, write_back: bool = True,
                  interpret: bool = False) -> list[Launch]:
    """The launches of one pass over ``blocks``: one per (weights' dtype, served dtype, 16-byte path or not)."""
    per_group = 4 if kind is ZKind.GAUSSIAN else 128
    max_groups = (INTERPRETER_TILE if interpret else GPU_TILE) // per_group
    buckets: dict[tuple, list[tuple[int, _Layout]]] = {}
    for i, block in enumerate(blocks):
        if block.theta.numel() == 0:  # e.g. a TP shard made only of padding: nothing to move
            continue
        layout = _layout(block, per_group)
        out_dtype = None if block.out is None else block.out.dtype
        buckets.setdefault((block.theta.dtype, out_dtype, _vector(block, layout)), []).append((i, layout))
    launches = []
    for (_, out_dtype, vector), members in buckets.items():
        # as few groups a program as the longest row needs (short rows waste no masked tiles), at most a full tile
        groups = min(max_groups, 1 << (max(layout.row_groups for _, layout in members) - 1).bit_length())
        base = blocks[members[0][0]]
        rows, programs = [], []
        first_program = 0
        for i, layout in members:
            block = blocks[i]
            per_row = -(-layout.row_groups // groups)
            out_offset = 0 if block.out is None else _offset(block.out, base.out)
            rows.append([_offset(block.theta, base.theta), out_offset, layout.row_stride, layout.out_row_stride,
                         layout.cols, layout.first_index, layout.index_row_stride, per_row, block.where.key,
                         first_program, int(block.decayed)])
            programs.append(layout.rows * per_row)
            first_program += layout.rows * per_row
        table = torch.tensor(rows, dtype=torch.int64)
        program_block = torch.repeat_interleave(torch.arange(len(members), dtype=torch.int32),
                                                torch.tensor(programs))
        launches.append(Launch(grid=(first_program,), base=members[0][0], table=table, program_block=program_block,
                               constexprs={"KIND": kind.code, "GROUPS": groups, "VECTOR": vector,
                                           "HAS_OUT": out_dtype is not None, "WRITE_BACK": write_back}))
    return launches


def _offset(t: torch.Tensor, base: torch.Tensor) -> int:
    """Elements from ``base``'s first element to ``t``'s (both of one dtype, so the bytes divide)."""
    delta = t.data_ptr() - base.data_ptr()
    assert delta % t.element_size() == 0, "blocks of one dtype are element-aligned"
    return delta // t.element_size()


def _interpreted(kernel) -> bool:
    """Whether Triton decorated ``kernel`` for its interpreter (TRITON_INTERPRET=1 when the module was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def zaxpy_triton_(
    blocks: Sequence[TritonBlock],
    seeds: torch.Tensor,
    restore: torch.Tensor,
    update: torch.Tensor,
    *,
    decay: float,
    kind: ZKind,
    write_back: bool = True,
    memo: dict | None = None,
) -> None:
    """One pass over ``blocks`` (all on one device; coefficient tensors there too): θ ← (θ + Σ restore·z)·d +
    Σ update·z, d = ``decay`` for decayed blocks; served copies written from θ rounded; θ written back unless
    ``write_back`` is off (a probe through masters). ``memo``: where to keep the launches (with their tables on the
    device) for the next pass over the same ``blocks``; the caller guarantees they are the same blocks."""
    from . import z_triton

    kernel = z_triton.zaxpy_kernel
    if not blocks:
        return
    interpret = _interpreted(kernel)
    device = blocks[0].theta.device
    key = (kind, write_back, interpret, device)
    plan = None if memo is None else memo.get(key)
    if plan is None:
        plan = [(launch, launch.table.to(device), launch.program_block.to(device))
                for launch in plan_launches(blocks, kind, write_back=write_back, interpret=interpret)]
        if memo is not None:
            memo[key] = plan
    for launch, table, program_block in plan:
        base = blocks[launch.base]
        kernel[launch.grid](base.theta, base.theta if base.out is None else base.out, table, program_block, seeds,
                            restore, update, seeds.numel(), float(decay), **launch.constexprs, **Launch.OPTIONS)
