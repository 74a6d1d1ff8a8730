"""The trajectory log: a fine-tune as "base weights + the list of (seed, projected gradient, lr, …)".

Every committed step appends one record: its seeds and scalars (the measured projected gradients, and the update
coefficients it applied, so that replay never re-derives a float from the losses, whatever the estimator and
step-size rule). So does a step that failed after perturbing the weights (its probe passes, see
:class:`AbortedProbes`), so that exact replay reproduces the served weights bit for bit. Saved as JSON (gzip when
the name ends in ``.gz``) with the records in columns: a 1,000-step single-probe run is a few tens of KB. Replay
regenerates each z from its seed and re-applies the updates to the base weights; the header pins what replay needs
to be faithful (the z generator's version, the kind of z, which tensors trained) and replay refuses a mismatch
rather than silently producing other weights.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sglang_mezo.kernels import READABLE, ZKind, stream_version

from .estimators import Estimator, sgd_update
from .params import TrainableSet
from .spsa import AbortedProbes, StepResult, replay_aborted, replay_step

FORMAT = "sglang-mezo-trajectory"
FORMAT_VERSION = 3
_READS = (1, 2, 3, 4)  # v1 had no aborted steps; v1 and v2 only SPSA steps with MeZO's update, -lr·g_k/n
SCALED_VERSION = 4
"""Written for a run with per-tensor scales or shards (its config's ``tensor_scales``, which replay applies, or
``shards > 1``, whose steps took their probes off in a pass of their own): a reader of version 3 would ignore them
and replay other weights, so it must refuse the document. Other runs still write 3."""


@dataclass(frozen=True)
class StepRecord:
    """One committed update, or (``aborted_passes > 0``) the probe passes of a step that failed and applied none.

    ``update`` holds the coefficients the commit applied to each z_k, as applied (after the estimator's
    normalisation and any adaptive step size): replay uses them, never re-deriving a float from the losses.
    ``estimator`` says which probe passes the step made (exact replay repeats them)."""

    step: int
    seeds: tuple[int, ...]
    projected_grads: tuple[float, ...]
    lr: float
    weight_decay: float
    eps: float
    aborted_passes: int = 0
    estimator: Estimator = Estimator.SPSA
    update: tuple[float, ...] = ()

    @property
    def committed(self) -> bool:
        return self.aborted_passes == 0


@dataclass
class Trajectory:
    """Header plus records. ``config`` is the run's :meth:`MezoConfig.to_dict`; ``base_model`` names the weights
    the first record applies to (a path or a model id: informative, replay does not load it)."""

    z_kind: ZKind
    trainable_fingerprint: str
    trainable_names: list[str]
    config: dict = field(default_factory=dict)
    base_model: str = ""
    generator_version: int = 1
    """The z stream version the records were recorded with; a low-rank z's config raises it to 2 (:attr:`needs`),
    whatever this says, since its records could only have been made with version 2."""
    created: float = field(default_factory=time.time)
    records: list[StepRecord] = field(default_factory=list)
    adapter: dict | None = None
    """For a LoRA adapter's trajectory: its :class:`~.lora.LoraSpec` (rank, alpha, target modules, and its start: a
    seed, or another adapter's trajectory or PEFT folder), from which :func:`~.lora.initial_weights` rebuilds the
    start the records apply to (their updates only, in fp32:
    :func:`~.probes.replay_updates`). None: the records apply to the base model's weights."""

    @classmethod
    def for_params(cls, params: TrainableSet, z_kind: ZKind, **header) -> Trajectory:
        return cls(
            z_kind=ZKind(z_kind),
            trainable_fingerprint=params.fingerprint(),
            trainable_names=sorted(params.manifest),
            **header,
        )

    def append(self, step: int, result: StepResult) -> None:
        self.records.append(
            StepRecord(
                step=step,
                seeds=result.seeds,
                projected_grads=result.projected_grads,
                lr=result.lr,
                weight_decay=result.weight_decay,
                eps=result.eps,
                estimator=result.estimator,
                update=result.applied_update,
            )
        )

    def append_aborted(self, step: int, aborted: AbortedProbes) -> None:
        self.records.append(
            StepRecord(step=step, seeds=aborted.seeds, projected_grads=(), lr=0.0, weight_decay=0.0,
                       eps=aborted.eps, aborted_passes=aborted.passes, estimator=aborted.estimator)
        )

    def upto(self, step: int) -> Trajectory:
        """A copy with the records before ``step`` (the weights after ``step`` committed steps); this one stays
        whole."""
        return dataclasses.replace(self, records=[r for r in self.records if r.step < step])

    @property
    def committed_steps(self) -> int:
        return sum(1 for r in self.records if r.committed)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self.records)

    # -- replay -------------------------------------------------------------------------------------------------

    def check_compatible(self, params: TrainableSet) -> None:
        """Raise ValueError unless replaying onto ``params`` with this code regenerates the recorded z."""
        if self.needs not in READABLE:
            raise ValueError(
                f"trajectory was recorded with z generator version {self.needs}; "
                f"this build replays versions {', '.join(map(str, READABLE))}"
            )
        if params.fingerprint() != self.trainable_fingerprint:
            missing = sorted(set(self.trainable_names) - set(params.manifest))[:5]
            raise ValueError(
                "the trainable tensors differ from the ones this trajectory was recorded on "
                f"(fingerprint {params.fingerprint()} != {self.trainable_fingerprint}; missing e.g. {missing})"
            )

    def replay(self, params: TrainableSet, *, upto: int | None = None, exact: bool = True) -> int:
        """Apply the records (all, or those with ``step < upto``) to ``params`` in place; returns how many committed
        steps it applied.

        ``params`` must hold the base weights (or the weights after the records already applied). See
        :func:`replay_step` for ``exact``; an update-only replay skips aborted steps, which applied no update.
        """
        self.check_compatible(params)
        params = params.variant(self.tensor_scales, self.z_rank)
        applied = 0
        for record in self.records:
            if upto is not None and record.step >= upto:
                break
            if not record.committed:
                if exact:
                    replay_aborted(params, AbortedProbes(record.seeds, record.eps, record.aborted_passes,
                                                         record.estimator), kind=self.z_kind)
                continue
            replay_step(
                params,
                record.seeds,
                update=record.update,
                eps=record.eps,
                lr=record.lr,
                weight_decay=record.weight_decay,
                kind=self.z_kind,
                estimator=record.estimator,
                exact=exact,
                probes_off=self.shards > 1,
            )
            applied += 1
        return applied

    @property
    def needs(self) -> int:
        """The stream version replay needs: the recorded one, or 2 where the config has a low-rank z (a job's
        trajectory is made before its config says so, and its low-rank records were made with version 2)."""
        return max(self.generator_version, stream_version(self.z_rank))

    @property
    def z_rank(self) -> int:
        """The rank of the run's low-rank z (its config's; 0: dense)."""
        return int(self.config.get("z_rank") or 0)

    @property
    def shards(self) -> int:
        """How many data-parallel replicas shared each step's batch (its config's; 1: one process)."""
        return int(self.config.get("shards") or 1)

    @property
    def tensor_scales(self) -> dict[str, float]:
        """The run's per-tensor scales (its config's), which its records' z were scaled by; empty: none."""
        return {str(n): float(v) for n, v in self.config.get("tensor_scales") or ()}

    # -- (de)serialisation ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": SCALED_VERSION if self.tensor_scales or self.shards > 1 else FORMAT_VERSION,
            "generator_version": self.needs,
            "z_kind": self.z_kind.value,
            "trainable_fingerprint": self.trainable_fingerprint,
            "trainable_names": self.trainable_names,
            "base_model": self.base_model,
            "created": self.created,
            "config": self.config,
            **({"adapter": self.adapter} if self.adapter is not None else {}),
            # columns: far smaller than one object per step
            "steps": {
                "step": [r.step for r in self.records],
                "seeds": [list(r.seeds) for r in self.records],
                "projected_grads": [list(r.projected_grads) for r in self.records],
                "lr": [r.lr for r in self.records],
                "weight_decay": [r.weight_decay for r in self.records],
                "eps": [r.eps for r in self.records],
                "aborted_passes": [r.aborted_passes for r in self.records],
                "estimator": [r.estimator.value for r in self.records],
                # null where the step applied MeZO's -lr·g_k/n (reading derives the same floats the run derived):
                # a default run's log stays as small as before v3
                "update": [None if r.update == sgd_update(r.projected_grads, r.lr) else list(r.update)
                           for r in self.records],
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> Trajectory:
        if data.get("format") != FORMAT or data.get("format_version") not in _READS:
            raise ValueError(f"not a {FORMAT} document of version {' or '.join(map(str, _READS))}")
        cols = data["steps"]
        count = len(cols["step"])
        aborted = cols.get("aborted_passes") or [0] * count
        estimators = cols.get("estimator") or [Estimator.SPSA.value] * count
        # null (and every step before v3): MeZO's -lr·g_k/n, the same floats, derived as the run derived them
        updates = [
            update if update is not None else () if passes else sgd_update([float(g) for g in grads], float(lr))
            for update, grads, lr, passes in zip(cols.get("update") or [None] * count, cols["projected_grads"],
                                                 cols["lr"], aborted, strict=True)
        ]
        records = [
            StepRecord(step=int(s), seeds=tuple(int(x) for x in seeds), projected_grads=tuple(float(g) for g in grads),
                       lr=float(lr), weight_decay=float(wd), eps=float(eps), aborted_passes=int(passes),
                       estimator=Estimator(estimator), update=tuple(float(u) for u in update))
            for s, seeds, grads, lr, wd, eps, passes, estimator, update in zip(
                cols["step"], cols["seeds"], cols["projected_grads"], cols["lr"], cols["weight_decay"], cols["eps"],
                aborted, estimators, updates, strict=True,
            )
        ]
        trajectory = cls(
            z_kind=ZKind(data["z_kind"]),
            trainable_fingerprint=data["trainable_fingerprint"],
            trainable_names=list(data["trainable_names"]),
            config=dict(data.get("config") or {}),
            base_model=data.get("base_model", ""),
            generator_version=int(data["generator_version"]),
            created=float(data.get("created", 0.0)),
            records=records,
            adapter=data.get("adapter"),
        )
        if trajectory.generator_version < trajectory.needs:  # only a hand-edited document: to_dict writes needs
            raise ValueError(f"trajectory says z generator version {trajectory.generator_version}, but its low-rank "
                             f"z needs {trajectory.needs}")
        return trajectory

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        payload = self.dumps().encode()
        path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return cls.from_dict(json.loads(raw))
