"""Half-precision weights trained exactly: an fp32 master of every trainable block, the served weights rounded from it.

A bf16 weight can hold neither MeZO's update (lr·g·z ≈ 1e-6 against a spacing of 2^-7 ≈ 8e-3 above 1.0: it
rounds away) nor come back from a ±εz probe (each move rounds). So the truth lives in fp32 and the served tensors
are only ever *written from it*:

- a probe:   served ← round(master + Σ_k c_k·z_k), the master untouched;
- a restore: served ← round(master), the served weights of before, bit for bit;
- a commit:  master ← master·d + Σ_k u_k·z_k in fp32, then served ← round(master), in the same read.

The core keeps issuing its incremental passes (+εz, −2εz, then +εz with the update); this layer keeps the sum of
the live probe coefficients per seed (sums of ±ε that are exact in floating point) and turns each pass into one of
the three above. A commit's arithmetic is the plain fp32 pass's, so the master moves exactly as fp32 weights do
under an update-only replay of the same trajectory.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from sglang_mezo.kernels import ZKind, ZTarget, as_block, zaxpy_


class Placement(enum.Enum):
    """Where the masters live: beside the served weights, or in (pinned) host memory, streamed to the device one
    tensor at a time for each pass (for a trainable set whose fp32 copy does not fit on the device)."""

    DEVICE = "device"
    HOST = "host"


@dataclass(frozen=True)
class Precision:
    """How the served weights are held: their dtype and where their fp32 masters live (``--mezo-master``)."""

    served_dtype: str
    """``float32``, ``bfloat16``, ``float16`` (torch's name without ``torch.``)."""
    master: str = "none"

    @classmethod
    def of(cls, dtype: torch.dtype, master: str) -> Precision:
        return cls(str(dtype).removeprefix("torch."), master)

    @property
    def half(self) -> bool:
        return self.served_dtype in ("bfloat16", "float16")

    @property
    def master_bytes_per_parameter(self) -> int:
        """What training adds per trainable parameter (masters exist only for half-precision weights)."""
        return 4 if self.half and self.master != "none" else 0

    @property
    def refusal(self) -> str | None:
        """Why this server cannot train, if it cannot."""
        if self.half and self.master == "none":
            return (f"this server serves {self.served_dtype} weights, in which MeZO's updates (~1e-6) round away "
                    f"and probes do not come back exactly: start it with --mezo-master device (or host) to train "
                    f"through fp32 masters")
        return None


def _storage_key(theta: torch.Tensor) -> tuple:
    return theta.device, theta.data_ptr(), tuple(theta.shape), tuple(theta.stride())


@dataclass
class MasterWeights:
    """The fp32 masters of one process's trainable blocks, shared by every trainable set built on that process
    (sets of different selections alias the same storage, so a block has one master whichever set moves it)."""

    placement: Placement = Placement.DEVICE
    _masters: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _live: dict[int, float] = field(default_factory=dict)
    """seed -> the probe coefficient currently on the served weights (absent when 0)."""

    # -- building ----------------------------------------------------------------------------------------------

    def attach(self, targets: Sequence[ZTarget]) -> list[ZTarget]:
        """The targets, each with its master (made from the served values on first sight: exact, as fp32 holds
        every bf16 and fp16 value)."""
        return [replace(t, master=self.master_of(t.theta)) for t in targets]

    def master_of(self, theta: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """theta's master (theta: a trainable piece's storage, or its 2-D block), as a 2-D fp32 block; one not
        made yet is made from ``values`` (any dtype, theta's number of elements), or from theta's own."""
        theta = as_block(theta)
        key = _storage_key(theta)
        master = self._masters.get(key)
        if master is None:
            source = theta if values is None else values.reshape(theta.shape)
            device = "cpu" if self.placement is Placement.HOST else theta.device
            master = source.detach().to(device=device, dtype=torch.float32, copy=True).contiguous()
            if self.placement is Placement.HOST and theta.is_cuda:
                master = master.pin_memory()
            self._masters[key] = master
        return master

    def has(self, theta: torch.Tensor) -> bool:
        """Whether theta (a piece's storage or its block) has a master yet."""
        return _storage_key(as_block(theta)) in self._masters

    @property
    def nbytes(self) -> int:
        """Bytes the masters take (4 per trainable element held by this process)."""
        return sum(m.numel() * m.element_size() for m in self._masters.values())

    # -- passes --------------------------------------------------------------------------------------------------

    @property
    def probing(self) -> bool:
        """Whether the served weights carry a probe (differ from round(master))."""
        return bool(self._live)

    def apply(
        self,
        targets: Sequence[ZTarget],
        seeds: Sequence[int],
        restore: Sequence[float],
        update: Sequence[float] | None = None,
        *,
        decay: float = 1.0,
        kind: ZKind,
    ) -> None:
        """One of the core's passes (:func:`~sglang_mezo.kernels.zaxpy_`'s arguments) on master-backed targets."""
        update = [0.0] * len(seeds) if update is None else list(update)
        live = dict(self._live)
        for seed, coefficient in zip(seeds, restore, strict=True):
            live[seed] = live.get(seed, 0.0) + coefficient
            if live[seed] == 0.0:
                del live[seed]
        if any(u != 0.0 for u in update) or decay != 1.0:
            if live:  # the core always takes its probe off in the pass that updates
                raise ValueError("an update while a probe is on the weights")
            zaxpy_(targets, seeds, [0.0] * len(seeds), update, decay=decay, kind=kind, commit=True)
        elif live:
            zaxpy_(targets, list(live), list(live.values()), kind=kind, commit=False)
        else:
            self.write_served(targets)
        self._live = live

    def write_served(self, targets: Sequence[ZTarget]) -> None:
        """served ← round(master) for every target: the exact served weights of the last commit."""
        with torch.no_grad():
            for t in targets:
                assert t.master is not None
                t.theta.copy_(t.master.view(t.theta.shape))
        self._live = {}

    def forget_probe(self) -> None:
        """After the served weights were overwritten outside this layer (a reload): no probe is on them."""
        self._live = {}

    def load(self, theta: torch.Tensor, block: torch.Tensor) -> None:
        """A block read from the checkpoint (any dtype) becomes theta's master, and theta its rounding."""
        fresh = not self.has(theta)
        master = self.master_of(theta, block)
        with torch.no_grad():
            if not fresh:
                master.copy_(block.reshape(master.shape))
            theta.copy_(master.view(theta.shape))
