"""The trainable set: which weights MeZO moves, keyed by their names in the Hugging Face checkpoint.

An engine (transformers, SGLang on one TP rank, …) describes its weights as :class:`TrainablePiece` s: a block of
local storage plus the checkpoint tensor it belongs to and where in it. The core never sees an engine's own
parameter names, fused layouts or shards, only this.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from sglang_mezo.kernels import PassTargets, ZKind, ZSlice, ZTarget, as_block, check_rank, tensor_key, zaxpy_

from .master import MasterWeights

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class TrainablePiece:
    """A block of an engine's storage that holds (part of) one checkpoint tensor.

    ``data`` is any view of the engine's weights with unit stride along its last dimension (a slice of a fused
    ``qkv_proj`` for example); its element (r, c), in the 2-D view, is element (row_offset + r, col_offset + c)
    of checkpoint tensor ``name`` viewed as ``[numel // full_shape[-1], full_shape[-1]]``.
    """

    name: str
    data: torch.Tensor
    full_shape: tuple[int, ...]
    row_offset: int = 0
    col_offset: int = 0


def applies_weight_decay(name: str, full_shape: Sequence[int]) -> bool:
    """Weight decay skips biases and normalisation weights (the MeZO paper and HF Trainer convention)."""
    lowered = name.lower()
    return len(full_shape) >= 2 and not lowered.endswith(".bias") and "norm" not in lowered


def check_scales(scales: Mapping[str, float], names: Iterable[str]) -> None:
    """Per-tensor scales must name exactly the trainable tensors, each a positive finite number (ValueError)."""
    names = set(names)
    missing, extra = sorted(names - set(scales)), sorted(set(scales) - names)
    if missing or extra:
        raise ValueError(f"per-tensor scales must name exactly the trainable tensors: missing {missing[:3]}, "
                         f"not trainable {extra[:3]}")
    bad = [n for n, v in scales.items() if not (isinstance(v, int | float) and math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"per-tensor scales must be positive finite numbers: {bad[:3]}")


def layer_index(name: str) -> int | None:
    """The transformer block a checkpoint tensor belongs to (``model.layers.7.…`` -> 7), None for the others."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ParamSelection:
    """Which checkpoint tensors train: those that match any ``include`` pattern (all, if none is given), match no
    ``exclude`` pattern, and, with ``last_layers = k``, belong to one of the last k transformer blocks (which
    leaves out embeddings, the final norm and the head). Patterns are regular expressions searched in the
    checkpoint name.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    last_layers: int | None = None

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude):
            re.compile(pattern)  # raise on a bad pattern at configuration time, not mid-job
        if self.last_layers is not None and self.last_layers < 1:
            raise ValueError("last_layers must be >= 1")

    def select(self, names: Iterable[str], num_layers: int | None) -> list[str]:
        """The selected names, in the order given."""
        if self.last_layers is not None and num_layers is None:
            raise ValueError("last_layers needs the engine to report its number of layers")
        chosen = []
        for name in names:
            if self.include and not any(re.search(p, name) for p in self.include):
                continue
            if any(re.search(p, name) for p in self.exclude):
                continue
            if self.last_layers is not None:
                layer = layer_index(name)
                if layer is None or layer < num_layers - self.last_layers:
                    continue
            chosen.append(name)
        return chosen

    def to_dict(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude), "last_layers": self.last_layers}


@dataclass
class TrainableSet:
    """The selected checkpoint tensors (the *manifest*: names and full shapes, the same on every TP rank) and the
    local pieces that hold them on this process, ready for the kernels."""

    manifest: dict[str, tuple[int, ...]]
    pieces: list[TrainablePiece]
    masters: MasterWeights | None = None
    """fp32 masters of half-precision weights (see :mod:`.master`); None: the pieces are trained in place."""
    scales: Mapping[str, float] | None = None
    """Per-tensor scales (every tensor of the manifest, by checkpoint name): tensor t moves along scale_t·z, in its
    probes and its updates (see :meth:`variant`). None: every scale is 1."""
    z_rank: int = 0
    """0: dense z; r >= 1: every matrix moves along a rank-r z (:mod:`sglang_mezo.kernels.z_lowrank`), the
    one-dimensional tensors along dense z."""
    targets: PassTargets = field(init=False, repr=False)
    _variants: dict[tuple, TrainableSet] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = {p.name for p in self.pieces} - set(self.manifest)
        if unknown:
            raise ValueError(f"pieces of tensors outside the manifest: {sorted(unknown)[:5]}")
        if self.scales is not None:
            check_scales(self.scales, self.manifest)
        check_rank(self.z_rank)
        self.targets = [
            ZTarget(
                theta=as_block(p.data),
                where=ZSlice(
                    key=tensor_key(p.name),
                    full_cols=p.full_shape[-1] if p.full_shape else 1,
                    row_offset=p.row_offset,
                    col_offset=p.col_offset,
                ),
                decay=applies_weight_decay(p.name, p.full_shape),
                scale=1.0 if self.scales is None else float(self.scales[p.name]),
                rank=self.z_rank if len(p.full_shape) >= 2 else 0,
            )
            for p in self.pieces
        ]
        if self.masters is not None:
            self.targets = self.masters.attach(self.targets)
        self.targets = PassTargets(self.targets)  # every pass reuses what the launcher derives from them

    def apply(
        self,
        seeds: Sequence[int],
        restore: Sequence[float],
        update: Sequence[float] | None = None,
        *,
        decay: float = 1.0,
        kind: ZKind,
    ) -> None:
        """One pass over the trainable weights (:func:`~sglang_mezo.kernels.zaxpy_`'s arguments), in place or
        through the masters."""
        if self.masters is None:
            zaxpy_(self.targets, seeds, restore, update, decay=decay, kind=kind)
        else:
            self.masters.apply(self.targets, seeds, restore, update, decay=decay, kind=kind)

    def variant(self, scales: Mapping[str, float] | Sequence[tuple[str, float]] = (),
                z_rank: int = 0) -> TrainableSet:
        """This set moving along other directions: per-tensor scales (a mapping, or (name, scale) pairs; empty:
        none) and low-rank z for its matrices (``z_rank`` >= 1). The same storage and masters, other pass targets;
        with neither, this set itself. Made once per distinct variant and kept, so that every step of a job reuses
        one launch plan."""
        scales = dict(scales)
        if not scales and not z_rank:
            return self
        key = (tuple(sorted(scales.items())), z_rank)
        if key not in self._variants:
            self._variants[key] = TrainableSet(self.manifest, self.pieces, self.masters, scales or None, z_rank)
        return self._variants[key]

    @classmethod
    def from_pieces(
        cls,
        pieces: Sequence[TrainablePiece],
        selection: ParamSelection | None = None,
        num_layers: int | None = None,
        masters: MasterWeights | None = None,
    ) -> TrainableSet:
        """Select among an engine's pieces. The manifest is built from the pieces themselves, so this is for
        engines that hold every tensor (transformers, TP 1); sharded engines pass their full manifest."""
        manifest: dict[str, tuple[int, ...]] = {}
        for piece in pieces:
            manifest.setdefault(piece.name, tuple(piece.full_shape))
        chosen = set((selection or ParamSelection()).select(manifest, num_layers))
        if not chosen:
            raise ValueError("the parameter selection matches no trainable tensor")
        return cls(
            manifest={n: s for n, s in manifest.items() if n in chosen},
            pieces=[p for p in pieces if p.name in chosen],
            masters=masters,
        )

    @property
    def numel(self) -> int:
        """Number of trainable scalars in the full (unsharded) model."""
        total = 0
        for shape in self.manifest.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def fingerprint(self) -> str:
        """A hash of the manifest (names and full shapes): equal for the same selection at any TP degree, so a
        trajectory can check that it is replayed onto the tensors it was trained on."""
        payload = json.dumps(sorted((n, list(s)) for n, s in self.manifest.items()))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def weights_digest(pieces: Iterable[TrainablePiece]) -> str:
    """A SHA-256 of the pieces' values, byte for byte, keyed by checkpoint name and position (each distinct block
    once, tied weights included once): two engines that hold the same blocks of the same tensors (a replica and a
    one-process replay, or two replicas) have equal digests exactly when every byte is equal."""
    blocks = {(p.name, p.row_offset, p.col_offset): p for p in pieces}
    digest = hashlib.sha256()
    for key in sorted(blocks):
        data = blocks[key].data
        digest.update(json.dumps([*key, list(data.shape), str(data.dtype)]).encode())
        digest.update(data.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
