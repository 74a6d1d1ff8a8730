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
from .triton_launch import TritonBlock, zaxpy_triton_
from .z_lowrank import zaxpy_lowrank_
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
    scale: float = 1.0
    """This block moves along scale·z: every coefficient of a pass (restore and update) is multiplied by it, in
    float64, before it is rounded to the kernels' fp32 (per-tensor step sizes; 1 leaves a pass bit for bit as it
    was). Blocks of one scale share a launch."""
    rank: int = 0
    """0: the dense z of the pass's kind; r >= 1: the low-rank z = U·Vᵀ/√r of :mod:`.z_lowrank` (stream version 2),
    for blocks of matrices only."""


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


class PassTargets(Sequence[ZTarget]):
    """The targets of every pass of one trainable set, kept together with what the Triton launcher derives from
    them (the blocks' table and program map, per z kind), built on the first pass and reused: a pass then costs the
    host one launch, not a walk over every tensor. Valid because served tensors are never reallocated."""

    def __init__(self, targets: Sequence[ZTarget]) -> None:
        self._targets = tuple(targets)
        self._split: dict[bool, tuple[dict[torch.device, list[TritonBlock]], list[int]]] = {}
        self.plans: dict[tuple, list] = {}
        """What :func:`.triton_launch.zaxpy_triton_` memoises for these blocks, keyed by its own key."""

    def __getitem__(self, i):
        return self._targets[i]

    def __len__(self) -> int:
        return len(self._targets)

    def device_blocks(self, force_triton: bool) -> tuple[dict[tuple[torch.device, float], list[TritonBlock]],
                                                         list[int]]:
        """The blocks that run on Triton in one launch per device and scale, and the indices of the targets that do
        not (CPU tensors, and masters in host memory, streamed one tensor at a time)."""
        if force_triton not in self._split:
            self._split[force_triton] = _device_blocks(self._targets, force_triton)
        return self._split[force_triton]


def _device_blocks(targets: Sequence[ZTarget], force_triton: bool = False):
    blocks: dict[tuple[torch.device, float], list[TritonBlock]] = {}
    others = []
    for i, t in enumerate(targets):
        if t.rank == 0 and (t.theta.is_cuda or force_triton) and (t.master is None or
                                                                  t.master.device == t.theta.device):
            source, out = (t.theta, None) if t.master is None else (t.master, t.theta)
            blocks.setdefault((t.theta.device, t.scale), []).append(TritonBlock(as_block(source), None if out is None else
                                                                     as_block(out), t.where, t.decay))
        else:
            others.append(i)
    return blocks, others


def _zaxpy_impl(targets: Sequence[ZTarget], seeds: list[int], restore: list[float], update: list[float],
                decay: float, kind: ZKind, force_triton: bool, commit: bool) -> None:
    if isinstance(targets, PassTargets):
        on_triton, others = targets.device_blocks(force_triton)
        memo = targets.plans
    else:
        on_triton, others = _device_blocks(targets, force_triton)
        memo = None
    for (device, scale), blocks in on_triton.items():
        zaxpy_triton_(blocks, *_coefficients(device, seeds, _scaled(restore, scale), _scaled(update, scale)),
                      decay=decay, kind=kind, write_back=commit or targets[0].master is None,
                      memo=None if memo is None else memo.setdefault(("scale", scale), {}))
    for i in others:
        t = targets[i]
        target_decay = decay if t.decay else 1.0
        t_restore, t_update = _scaled(restore, t.scale), _scaled(update, t.scale)  # this target's own
        if t.rank:  # PyTorch's elementwise ops on either device; a host master goes through the device and back
            source = as_block(t.theta) if t.master is None else t.master.to(t.theta.device, non_blocking=True)
            zaxpy_lowrank_(source, None if t.master is None else as_block(t.theta), t.where, seeds=seeds,
                           restore=t_restore, update=t_update, decay=target_decay, kind=kind, rank=t.rank,
                           dense=_dense_z, write_back=commit or t.master is None)
            if commit and t.master is not None and source is not t.master:
                t.master.copy_(source)
        elif t.theta.is_cuda or force_triton:  # a master in host memory, streamed through the device
            source = t.master.to(t.theta.device, non_blocking=True)
            zaxpy_triton_([TritonBlock(source, as_block(t.theta), t.where, t.decay)],
                          *_coefficients(t.theta.device, seeds, t_restore, t_update), decay=decay, kind=kind,
                          write_back=commit)
            if commit:
                t.master.copy_(source)
        elif t.master is not None:
            _master_pass_cpu(t.master, as_block(t.theta), t.where, commit=commit, seeds=seeds, restore=t_restore,
                             update=t_update, decay=target_decay, kind=kind)
        else:
            cpu_pass = zaxpy_numba_ if t.theta.dtype in NUMBA_DTYPES else zaxpy_torch_
            cpu_pass(as_block(t.theta), t.where, seeds=seeds, restore=t_restore, update=t_update,
                     decay=target_decay, kind=kind)


def _scaled(coefficients: list[float], scale: float) -> list[float]:
    return coefficients if scale == 1.0 else [c * scale for c in coefficients]


def _coefficients(device: torch.device, seeds: list[int], restore: list[float],
                  update: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.tensor(seeds, dtype=torch.int64, device=device),
            torch.tensor(restore, dtype=torch.float32, device=device),
            torch.tensor(update, dtype=torch.float32, device=device))


@torch.library.custom_op("sglang_mezo::zaxpy_", mutates_args=("thetas", "masters"))
def _zaxpy_op(
    thetas: list[torch.Tensor],
    masters: list[torch.Tensor],
    commit: bool,
    keys: list[int],
    full_cols: list[int],
    row_offsets: list[int],
    col_offsets: list[int],
    decayed: list[bool],
    scales: list[float],
    ranks: list[int],
    seeds: list[int],
    restore: list[float],
    update: list[float],
    decay: float,
    kind: int,
    force_triton: bool,
) -> None:
    """A pass as torch sees it under ``torch.compile``: the tensors it mutates, declared."""
    targets = [ZTarget(theta, ZSlice(key, fc, ro, co), d, masters[i] if masters else None, scale, rank)
               for i, (theta, key, fc, ro, co, d, scale, rank) in enumerate(
                   zip(thetas, keys, full_cols, row_offsets, col_offsets, decayed, scales, ranks, strict=True))]
    _zaxpy_impl(targets, seeds, restore, update, decay, ZKind.GAUSSIAN if kind == 0 else ZKind.RADEMACHER,
                force_triton, commit)


@_zaxpy_op.register_fake
def _(thetas, masters, commit, keys, full_cols, row_offsets, col_offsets, decayed, scales, ranks, seeds, restore,
      update, decay, kind, force_triton) -> None:
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
    ``decay`` flag is set and 1 otherwise, and every coefficient times the target's ``scale``. In place, fp32 math,
    no parameter-sized temporaries.

    Targets with a ``master`` (all of them or none): the right side reads the master for θ, the result is
    written rounded to the served ``theta``, and to the master as well only with ``commit``.

    A perturbation is ``restore=[ε]``; MeZO's last pass of a step, "undo the probe and apply the update" in one
    read and one write of the weights, is ``restore=[0, …, ε]``, ``update=[-lr·g_k/n …]``, ``decay=1-lr·wd``.
    ``force_triton`` runs the Triton kernel on CPU tensors too (under ``TRITON_INTERPRET=1``; for tests). Passes
    over a :class:`PassTargets` reuse its launch plan. Under ``torch.compile`` the pass is a custom op that
    declares what it mutates; in eager mode it is called directly (the op's dispatch over two lists of every
    tensor would cost more host time than the launch).
    """
    if not seeds:
        return
    seeds = [check_seed(s) for s in seeds]
    restore = [float(c) for c in restore]
    update = [0.0] * len(seeds) if update is None else [float(c) for c in update]
    if not len(restore) == len(update) == len(seeds):
        raise ValueError("seeds, restore and update must have the same length")
    if not targets:
        return
    with_master = sum(t.master is not None for t in targets)
    if with_master and with_master != len(targets):
        raise ValueError("a pass takes targets that all have a master, or none that has")
    if not torch.compiler.is_compiling():
        _zaxpy_impl(targets, seeds, restore, update, float(decay), kind, force_triton, commit)
        return
    _zaxpy_op(
        [t.theta for t in targets],
        [t.master for t in targets] if with_master else [],
        commit,
        [t.where.key for t in targets],
        [t.where.full_cols for t in targets],
        [t.where.row_offset for t in targets],
        [t.where.col_offset for t in targets],
        [t.decay for t in targets],
        [t.scale for t in targets],
        [t.rank for t in targets],
        seeds,
        restore,
        update,
        float(decay),
        kind.code,
        force_triton,
    )


def _dense_z(seed: int, where: ZSlice, shape: tuple[int, int], kind: ZKind, device: torch.device) -> torch.Tensor:
    return materialize_z(seed, where, shape, kind, device=device)


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
