"""The server-wide MeZO options (``--enable-mezo`` and the defaults a job inherits), parsed once at launch.

SGLang's ``ServerArgs`` is a sealed msgspec struct: plugin flags are added to its argparse parser and their values
kept in the underscore attribute ``ServerArgs._mezo``, which travels to the scheduler processes with the rest.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from sglang_mezo.core.params import ParamSelection
from sglang_mezo.kernels import ZKind

ATTRIBUTE = "_mezo"


@dataclass(frozen=True)
class MezoServerOptions:
    enabled: bool = False
    lr: float = 1e-6
    eps: float = 1e-3
    n_probes: int = 1
    z_kind: str = "auto"
    """``auto``: Rademacher on a CPU (a Gaussian pass over SmolLM2 costs seconds there), Gaussian on a GPU."""
    max_steps_per_job: int = 10_000
    chunk_ms: float = 200.0
    """Steps are sent to the scheduler in chunks of about this duration; user requests wait at most one chunk."""
    yield_ms: float = 2000.0
    """After each chunk, training waits (at most this long) for the user requests in flight at that moment to
    finish, so a request that arrives during a chunk is served to the end before the next one."""
    selection: ParamSelection = field(default_factory=ParamSelection)

    def __post_init__(self) -> None:
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--mezo-{name} must be a finite number >= 0, got {value}")
        if self.eps == 0:
            raise ValueError("--mezo-eps must be > 0")
        for name in ("chunk_ms", "yield_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--mezo-{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.n_probes < 1 or self.max_steps_per_job < 1:
            raise ValueError("--mezo-n-probes and --mezo-max-steps-per-job must be >= 1")
        if self.z_kind != "auto":
            ZKind(self.z_kind)

    def resolved_z_kind(self, device: str) -> ZKind:
        if self.z_kind != "auto":
            return ZKind(self.z_kind)
        return ZKind.RADEMACHER if device == "cpu" else ZKind.GAUSSIAN


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MeZO fine-tuning (sglang-mezo)")
    group.add_argument("--enable-mezo", action="store_true",
                       help="Serve the /mezo/* API and let training jobs update the served weights in place.")
    group.add_argument("--mezo-lr", type=float, default=MezoServerOptions.lr, help="Default learning rate of a job.")
    group.add_argument("--mezo-eps", type=float, default=MezoServerOptions.eps,
                       help="Default perturbation scale ε of a job.")
    group.add_argument("--mezo-n-probes", type=int, default=MezoServerOptions.n_probes,
                       help="Default number of SPSA probes per step.")
    group.add_argument("--mezo-z-kind", choices=["auto", *(k.value for k in ZKind)], default="auto",
                       help="Distribution of the direction z; auto = rademacher on CPU, gaussian on GPU.")
    group.add_argument("--mezo-max-steps-per-job", type=int, default=MezoServerOptions.max_steps_per_job,
                       help="Upper bound on the steps one job may ask for.")
    group.add_argument("--mezo-chunk-ms", type=float, default=MezoServerOptions.chunk_ms,
                       help="Target duration of a chunk of steps; user requests wait at most one chunk "
                            "(0: one step per chunk).")
    group.add_argument("--mezo-yield-ms", type=float, default=MezoServerOptions.yield_ms,
                       help="After each chunk, wait up to this long for the user requests in flight to finish "
                            "before the next chunk (0: do not wait).")
    group.add_argument("--mezo-train", action="append", default=[], metavar="REGEX",
                       help="Train only checkpoint tensors whose name matches (repeatable; default: all).")
    group.add_argument("--mezo-freeze", action="append", default=[], metavar="REGEX",
                       help="Never train checkpoint tensors whose name matches (repeatable).")
    group.add_argument("--mezo-last-layers", type=int, default=None, metavar="K",
                       help="Train only the last K transformer blocks.")


def from_namespace(ns: argparse.Namespace) -> MezoServerOptions:
    return MezoServerOptions(
        enabled=bool(getattr(ns, "enable_mezo", False)),
        lr=ns.mezo_lr,
        eps=ns.mezo_eps,
        n_probes=ns.mezo_n_probes,
        z_kind=ns.mezo_z_kind,
        max_steps_per_job=ns.mezo_max_steps_per_job,
        chunk_ms=ns.mezo_chunk_ms,
        yield_ms=ns.mezo_yield_ms,
        selection=ParamSelection(include=tuple(ns.mezo_train), exclude=tuple(ns.mezo_freeze),
                                 last_layers=ns.mezo_last_layers),
    )


def options_of(server_args) -> MezoServerOptions:
    """The options a server was launched with (defaults, i.e. disabled, if the plugin saw no flags)."""
    return getattr(server_args, ATTRIBUTE, None) or MezoServerOptions()
