"""The server-wide MeZO options (``--enable-mezo``, the defaults a job inherits, its limits and the folders it may
read and write), parsed once at launch.

SGLang's ``ServerArgs`` is a sealed msgspec struct: plugin flags are added to its argparse parser and their values
kept in the underscore attribute ``ServerArgs._mezo``, which travels to the scheduler processes with the rest.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from sglang_mezo.core.estimators import Adaptive, Estimator
from sglang_mezo.core.lora import ServedAdapter
from sglang_mezo.core.params import ParamSelection
from sglang_mezo.core.recipe import Knobs, probes_for
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.kernels import ZKind

ATTRIBUTE = "_mezo"


@dataclass(frozen=True)
class Limits:
    """What one request or job may ask of the server. Each is a ``--mezo-*`` flag (the field name, dashed); over a
    limit is a 400, 413 or 429 that names the flag, and the server is left as it was."""

    max_steps_per_job: int = field(default=10_000, metadata={"help": "steps one job may ask for"})
    max_examples_per_job: int = field(default=100_000, metadata={
        "help": "training and held-out examples of one job together, inline or from a data file"})
    max_tokens_per_job: int = field(default=10_000_000, metadata={
        "help": "tokens of one job's examples together (prompts, completions, every option)"})
    max_probes: int = field(default=64,
                            metadata={"help": "probes per step (SPSA's cost two forwards each, FZOO's one)"})
    max_queued_jobs: int = field(default=16, metadata={"help": "jobs queued or running at once"})
    max_adapter_jobs: int = field(default=4, metadata={"help": "adapter jobs training at once (each beside the "
                                                                 "others and the base's queue)"})
    max_event_streams: int = field(default=32, metadata={
        "help": "open event streams at once (GET /mezo/jobs/{id}/events, /v1/fine_tuning/jobs/{id}/events "
                "?stream=true)"})
    max_body_mb: float = field(default=64.0, metadata={
        "help": "size of one /mezo request body (and of one upload to /v1/files), in MB"})
    max_stored_files: int = field(default=100, metadata={"help": "files kept at once from POST /v1/files"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 1):
                raise ValueError(f"{self.flag(f.name)} must be >= 1, got {value}")

    @staticmethod
    def flag(name: str) -> str:
        return "--mezo-" + name.replace("_", "-")


@dataclass(frozen=True)
class Folders:
    """Where the API may touch the server's disk: data files are read only inside ``data_dirs``, checkpoints are
    written only inside ``output_dir``. None (or no folder): that kind of file access is off."""

    data_dirs: tuple[str, ...] = ()
    output_dir: str | None = None

    def __post_init__(self) -> None:
        for d in self.data_dirs:
            if not Path(d).is_dir():
                raise ValueError(f"--mezo-data-dir {d}: not a folder")
        if self.output_dir is not None and Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"--mezo-output-dir {self.output_dir}: not a folder")


@dataclass(frozen=True)
class Fleet:
    """Several servers training one model (``--mezo-fleet-*``): each knows the leader's address, the fleet's size,
    its own rank, and a secret every message between them is signed with (see ``docs/fleet.md``)."""

    address: str
    """The leader's (rank 0's) HTTP ``host:port``: where the others fetch its history and join, and the host its
    first scheduler process hosts the group's rendezvous on."""
    size: int
    rank: int
    secret_file: str
    """A file holding the shared secret (a file, so that it is not on every process's command line)."""

    def __post_init__(self) -> None:
        if not self.host or not self.port.isdigit():
            raise ValueError(f"--mezo-fleet-address must be the leader's host:port, got {self.address!r}")
        if not 2 <= self.size <= 1024:
            raise ValueError(f"--mezo-fleet-size must be between 2 and 1024, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"--mezo-fleet-rank must be between 0 and --mezo-fleet-size - 1, got {self.rank}")
        if len(self.secret()) < 16:
            raise ValueError(f"--mezo-fleet-secret-file {self.secret_file}: the secret must be at least 16 bytes")

    @property
    def host(self) -> str:
        """The leader's host (its first scheduler process hosts the group's rendezvous there)."""
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> str:
        return self.address.rpartition(":")[2]

    @property
    def leads(self) -> bool:
        return self.rank == 0

    @property
    def leader_url(self) -> str:
        return f"http://{self.address}"

    def secret(self) -> bytes:
        try:
            return Path(self.secret_file).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"--mezo-fleet-secret-file: {exc}") from exc


@dataclass(frozen=True)
class MezoServerOptions:
    enabled: bool = False
    lr: float | None = None
    """This and the other knobs below left None: a job gets the recipe's (:mod:`sglang_mezo.core.recipe`)."""
    eps: float | None = None
    n_probes: int | None = None
    z_kind: str = "auto"
    """``auto``: Rademacher on a CPU (a Gaussian pass over SmolLM2 costs seconds there), Gaussian on a GPU."""
    estimator: str | None = None
    adaptive: str | None = None
    chunk_ms: float = 200.0
    """Steps are sent to the scheduler in chunks of about this duration; user requests wait at most one chunk."""
    yield_ms: float = 2000.0
    """After each chunk, training waits (at most this long) for the user requests in flight at that moment to
    finish, so a request that arrives during a chunk is served to the end before the next one."""
    selection: ParamSelection | None = None
    """None: no --mezo-train, --mezo-freeze or --mezo-last-layers (a job trains the recipe's set)."""
    limits: Limits = field(default_factory=Limits)
    folders: Folders = field(default_factory=Folders)
    master: str = "none"
    """``device`` / ``host``: fp32 masters of the trainable weights of a bf16/fp16 server (``--mezo-master``), see
    :mod:`sglang_mezo.core.master`; ``none``: weights are trained in place, and a half-precision server refuses
    to train."""
    state_dir: str | None = None
    """Where the served history is journaled (``--mezo-state-dir``); None: it lives in memory only."""
    resume: tuple[Trajectory, ...] = field(default=(), repr=False)
    """The served history the journal held at launch, one trajectory per job in order: the scheduler replays it onto
    the weights before serving (set by the plugin when it reads the journal)."""
    resume_base_version: str = field(default="", repr=False)
    """The base weights' own label, which the weights keep if that history cannot be replayed."""
    resume_adapters: tuple[ServedAdapter, ...] = field(default=(), repr=False)
    """The trained adapters the journal held at launch, each at the version its name served: the scheduler registers
    them with SGLang's LoRA manager before serving."""
    fleet: Fleet | None = None
    """With ``--mezo-fleet-address``: this server is one of a fleet's."""
    replica_address: str | None = field(default=None, repr=False)
    """Under ``--dp-size > 1``: the loopback ``host:port`` where the scheduler processes of every replica form
    their group (:mod:`sglang_mezo.scheduler.replicas`), chosen by the plugin in the HTTP process at launch."""

    def __post_init__(self) -> None:
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--mezo-{name} must be a finite number >= 0, got {value}")
        if self.eps == 0:
            raise ValueError("--mezo-eps must be > 0")
        for name in ("chunk_ms", "yield_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--mezo-{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.n_probes is not None and not 1 <= self.n_probes <= self.limits.max_probes:
            raise ValueError(f"--mezo-n-probes must be >= 1 and <= --mezo-max-probes ({self.limits.max_probes})")
        if self.z_kind != "auto":
            ZKind(self.z_kind)
        if self.adaptive is not None:
            Adaptive(self.adaptive)
        if self.master not in MASTER_CHOICES:
            raise ValueError(f"--mezo-master must be one of {', '.join(MASTER_CHOICES)}, got {self.master!r}")
        if self.estimator is not None and self.n_probes is not None and \
                self.n_probes < Estimator(self.estimator).min_probes:
            raise ValueError(f"--mezo-estimator {self.estimator} needs --mezo-n-probes >= "
                             f"{Estimator(self.estimator).min_probes}")
        recipe_probes = probes_for(None if self.estimator is None else Estimator(self.estimator), self.n_probes)[1]
        if self.limits.max_probes < recipe_probes:
            # otherwise every job that names no probes would be refused (a 400) for the recipe's own
            raise ValueError(f"--mezo-max-probes {self.limits.max_probes} is below the recipe's "
                             f"{recipe_probes} probes a step: give --mezo-n-probes too")

    def knobs(self) -> Knobs:
        """The knobs the operator set (each a job's default; the recipe fills the others)."""
        return Knobs(lr=self.lr, eps=self.eps, n_probes=self.n_probes,
                     estimator=None if self.estimator is None else Estimator(self.estimator),
                     adaptive=None if self.adaptive is None else Adaptive(self.adaptive), selection=self.selection)

    def resolved_z_kind(self, device: str) -> ZKind:
        if self.z_kind != "auto":
            return ZKind(self.z_kind)
        return ZKind.RADEMACHER if device == "cpu" else ZKind.GAUSSIAN


MASTER_CHOICES = ("none", "device", "host")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MeZO fine-tuning (sglang-mezo)")
    group.add_argument("--enable-mezo", action="store_true",
                       help="Serve the /mezo/* API and let training jobs update the served weights in place.")
    group.add_argument("--mezo-lr", type=float, default=None,
                       help="Default learning rate of a job (default: the recipe's, from what the job trains; README, "
                            "'Defaults').")
    group.add_argument("--mezo-eps", type=float, default=None,
                       help="Default perturbation scale ε of a job (default: the recipe's: 1e-3, 1e-2 for adapters).")
    group.add_argument("--mezo-n-probes", type=int, default=None,
                       help="Default number of probes per step (default: the recipe's: 8 FZOO probes; 1 for "
                            "spsa, 2 for greedy).")
    group.add_argument("--mezo-z-kind", choices=["auto", *(k.value for k in ZKind)], default="auto",
                       help="Distribution of the direction z; auto = rademacher on CPU, gaussian on GPU.")
    group.add_argument("--mezo-estimator", choices=[e.value for e in Estimator], default=None,
                       help="Default estimator of a job: fzoo (one-sided probes normalised by their spread, n_probes "
                            ">= 2; the recipe's, with 8), spsa (MeZO) or greedy (SPSA's probes, the step along the "
                            "best of them; n_probes >= 2).")
    group.add_argument("--mezo-adaptive", choices=[a.value for a in Adaptive], default=None,
                       help="Default step-size rule of a job: none, or scalar_rms (lr over a running RMS; the "
                            "recipe's).")
    group.add_argument("--mezo-master", choices=MASTER_CHOICES, default=MezoServerOptions.master,
                       help="For a bf16/fp16 server: keep an fp32 master of every trainable weight (4 bytes per "
                            "trainable parameter) on the device or in host memory, so that updates and probes are "
                            "exact; without it such a server refuses to train (updates would round away).")
    group.add_argument("--mezo-chunk-ms", type=float, default=MezoServerOptions.chunk_ms,
                       help="Target duration of a chunk of steps; user requests wait at most one chunk "
                            "(0: one step per chunk).")
    group.add_argument("--mezo-yield-ms", type=float, default=MezoServerOptions.yield_ms,
                       help="After each chunk, wait up to this long for the user requests in flight to finish "
                            "before the next chunk (0: do not wait).")
    group.add_argument("--mezo-train", action="append", default=[], metavar="REGEX",
                       help="Train only checkpoint tensors whose name matches (repeatable; without this, "
                            "--mezo-freeze and --mezo-last-layers: the recipe's set, the final norm).")
    group.add_argument("--mezo-freeze", action="append", default=[], metavar="REGEX",
                       help="Never train checkpoint tensors whose name matches (repeatable).")
    group.add_argument("--mezo-last-layers", type=int, default=None, metavar="K",
                       help="Train only the last K transformer blocks.")
    group.add_argument("--mezo-data-dir", action="append", default=[], metavar="DIR",
                       help="A folder jobs may read data files from (repeatable); without one, data files are off.")
    group.add_argument("--mezo-output-dir", default=None, metavar="DIR",
                       help="The folder POST /mezo/save writes checkpoints into; without it, saving is off.")
    group.add_argument("--mezo-state-dir", default=None, metavar="DIR",
                       help="Journal the served history here (fsync'd per committed chunk); a server started again "
                            "on it and the same base checkpoint serves the same weights. Default: memory only.")
    group.add_argument("--mezo-fleet-address", default=None, metavar="HOST:PORT",
                       help="Join a fleet of servers that train one model: the leader's (rank 0's) HTTP address, "
                            "given to every server of the fleet, the leader included (docs/fleet.md).")
    group.add_argument("--mezo-fleet-size", type=int, default=None, metavar="N",
                       help="How many servers the fleet may hold (with --mezo-fleet-address).")
    group.add_argument("--mezo-fleet-rank", type=int, default=None, metavar="R",
                       help="This server's rank in the fleet: 0 leads (with --mezo-fleet-address).")
    group.add_argument("--mezo-fleet-secret-file", default=None, metavar="PATH",
                       help="A file with the fleet's shared secret (>= 16 bytes): every message between its "
                            "servers is signed with it (with --mezo-fleet-address).")
    for f in fields(Limits):
        group.add_argument(Limits.flag(f.name), type=type(f.default), default=f.default, metavar="N",
                           help=f"Limit: {f.metadata['help']} (default: %(default)s).")


def from_namespace(ns: argparse.Namespace) -> MezoServerOptions:
    return MezoServerOptions(
        enabled=bool(getattr(ns, "enable_mezo", False)),
        lr=ns.mezo_lr,
        eps=ns.mezo_eps,
        n_probes=ns.mezo_n_probes,
        z_kind=ns.mezo_z_kind,
        estimator=ns.mezo_estimator,
        adaptive=ns.mezo_adaptive,
        chunk_ms=ns.mezo_chunk_ms,
        yield_ms=ns.mezo_yield_ms,
        selection=ParamSelection(include=tuple(ns.mezo_train), exclude=tuple(ns.mezo_freeze),
                                 last_layers=ns.mezo_last_layers)
        if ns.mezo_train or ns.mezo_freeze or ns.mezo_last_layers is not None else None,
        limits=Limits(**{f.name: getattr(ns, "mezo_" + f.name) for f in fields(Limits)}),
        folders=Folders(data_dirs=tuple(str(Path(d).resolve()) for d in ns.mezo_data_dir),
                        output_dir=str(Path(ns.mezo_output_dir).resolve()) if ns.mezo_output_dir else None),
        state_dir=str(Path(ns.mezo_state_dir).resolve()) if ns.mezo_state_dir else None,
        master=ns.mezo_master,
        fleet=_fleet(ns),
    )


def _fleet(ns: argparse.Namespace) -> Fleet | None:
    given = {name: getattr(ns, f"mezo_fleet_{name}", None) for name in ("address", "size", "rank", "secret_file")}
    if all(value is None for value in given.values()):
        return None
    missing = [f"--mezo-fleet-{name.replace('_', '-')}" for name, value in given.items() if value is None]
    if missing:
        raise ValueError(f"a fleet needs --mezo-fleet-address, -size, -rank and -secret-file: {', '.join(missing)} "
                         "missing")
    return Fleet(**given)


def options_of(server_args) -> MezoServerOptions:
    """The options a server was launched with (defaults, i.e. disabled, if the plugin saw no flags)."""
    return getattr(server_args, ATTRIBUTE, None) or MezoServerOptions()
