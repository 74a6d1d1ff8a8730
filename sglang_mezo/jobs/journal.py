"""The served history on disk (``--mezo-state-dir``), so that a fine-tune survives a restart or a crash.

``journal.jsonl`` is append-only, one JSON object per line, written and fsync'd as things happen: the base
checkpoint it applies to (first), each job as it starts, each chunk's committed steps, each evaluation, each job's
end, and each restore of the served weights. A server started again on the same folder and base checkpoint reads
it back (:func:`read`): the served history is replayed onto the weights before the first request, under the same
weight-version label, and the jobs are listed again; a job that was running is listed as failed, with the steps it
committed. A last line cut short (the process killed mid-write) is dropped; anything else unreadable stops the
launch with the line number.

What the journal does not keep: queued jobs that had not started (they never touched the weights) and the
examples of each job (only their count of steps, seeds and scalars matter to the weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.estimators import AdaptiveState, Estimator
from sglang_mezo.core.lora import LoraSpec, ServedAdapter
from sglang_mezo.core.objectives import EvalMetrics, Objective
from sglang_mezo.core.spsa import AbortedProbes, StepResult
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.kernels import ZKind
from sglang_mezo.protocol import (
    AdapterTarget,
    AdapterVersion,
    ChunkOutcome,
    Failure,
    FailureKind,
    StepReport,
    weight_version_label,
)

logger = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
FORMAT = "sglang-mezo-journal"
FORMAT_VERSION = 1


class JournalError(ValueError):
    """The state folder cannot be used: written for another base checkpoint, or damaged before its last line."""


class JournalWriteError(RuntimeError):
    """A record could not be written: what happens from now on would not survive a restart."""


IDENTITY_CACHE = "base-identity.json"


def base_identity(model_path: str | Path, cache_dir: Path | None = None) -> dict:
    """What identifies the base checkpoint: the SHA-256 of each safetensors file, by name. A copy of the folder
    elsewhere is the same base; other weights are not. Hashing reads every byte once: the result is kept in
    ``cache_dir`` by (size, mtime, inode), so a launch on an unchanged checkpoint does not read it again."""
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise JournalError(f"--mezo-state-dir needs the base checkpoint as a local folder of safetensors files, and "
                           f"{model_path} holds none")
    cache_file = cache_dir / IDENTITY_CACHE if cache_dir is not None else None
    try:
        cache = json.loads(cache_file.read_text()) if cache_file is not None and cache_file.exists() else {}
    except (OSError, ValueError):
        cache = {}
    identity, fresh = {}, {}
    for file in files:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
        if key not in cache:
            with file.open("rb") as f:
                cache[key] = hashlib.file_digest(f, "sha256").hexdigest()
        fresh[key] = identity[file.name] = cache[key]
    if cache_file is not None:
        try:
            cache_file.write_text(json.dumps(fresh))
        except OSError:  # only a cache
            pass
    return {"sha256": identity}


@dataclass(frozen=True)
class Segment:
    """A job's part of the served weights: its first ``records`` trajectory records, or all of them (None)."""

    job_id: str
    records: int | None = None


@dataclass
class JournaledJob:
    """A job as the journal knows it."""

    id: str
    config: MezoConfig
    objective: Objective
    batch_size: int
    purpose: str
    created: float
    started: float
    served_before: list[Segment]
    trajectory: Trajectory | None = None
    reports: list[StepReport] = field(default_factory=list)
    evals: list[tuple[int, EvalMetrics, str]] = field(default_factory=list)
    finished: float | None = None
    status: str = "running"
    failure: Failure | None = None
    adapter: AdapterTarget | None = None
    """An adapter job's adapter (its steps never belong to the served weights' history)."""
    adapter_version: AdapterVersion | None = None
    """The version of it the adapter's name served last."""
    trained_on: str = ""
    """The served weights' label when the adapter job started."""


@dataclass
class JournalState:
    """What a journal says: the base it applies to, every job, and the served weights as segments."""

    base: dict
    base_weight_version: str
    base_model: str = ""
    jobs: dict[str, JournaledJob] = field(default_factory=dict)
    served: list[Segment] = field(default_factory=list)

    def history(self, segments: list[Segment] | None = None) -> list[tuple[str, Trajectory]]:
        """(job id, trajectory or its first records) per segment, in order: the served weights by default."""
        out = []
        for segment in self.served if segments is None else segments:
            trajectory = self.jobs[segment.job_id].trajectory
            if trajectory is None:
                raise KeyError(f"job {segment.job_id} has no trajectory")
            if segment.records is not None:
                trajectory = dataclasses.replace(trajectory, records=trajectory.records[: segment.records])
            out.append((segment.job_id, trajectory))
        return out

    def adapters(self) -> list[ServedAdapter]:
        """Each trained adapter at the version its name served last (that of the latest job that published one)."""
        latest: dict[str, JournaledJob] = {}
        for job in sorted(self.jobs.values(), key=lambda j: j.created):
            if job.adapter is not None and job.adapter_version is not None and job.trajectory is not None:
                latest[job.adapter.name] = job
        return [ServedAdapter(name, job.adapter_version.lora_id,
                              job.trajectory.upto(job.adapter_version.committed_steps))
                for name, job in latest.items()]

    def weight_version(self) -> str:
        """The label of the served weights (that of the last segment; the base's without one)."""
        history = self.history()
        if not history:
            return self.base_weight_version
        job_id, trajectory = history[-1]
        records = trajectory.records
        return weight_version_label(job_id, trajectory.committed_steps, bool(records) and not records[-1].committed)


# -- writing ----------------------------------------------------------------------------------------------------------


class Journal:
    """Appends records to ``DIR/journal.jsonl``; each is on disk (fsync) before the call returns."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / JOURNAL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.failed: str | None = None
        """Why a record could not be written, once one could not."""

    def open(self, model_path: str, weight_version: str) -> JournalState:
        """The state the journal holds (a new journal starts with the base); raises :class:`JournalError` if it
        belongs to another base checkpoint or is damaged."""
        identity = base_identity(model_path, self.path.parent)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._append({"kind": "base", "format": FORMAT, "version": FORMAT_VERSION, "model_path": model_path,
                          "identity": identity, "weight_version": weight_version})
            _fsync_dir(self.path.parent)
        state = read(self.path)
        if state.base != identity:  # (a record from before the identity was a whole-file hash also ends here)
            raise JournalError(f"{self.path} was written for another base checkpoint than {model_path}: start with "
                               "that checkpoint, or another --mezo-state-dir")
        return state

    def job_started(self, job_id: str, spec_config: MezoConfig, objective: Objective, batch_size: int,
                    purpose: str, created: float, served_before: list[Segment],
                    adapter: AdapterTarget | None = None, trained_on: str = "") -> None:
        self._append({"kind": "job", "job_id": job_id, "config": spec_config.to_dict(), "objective": objective.value,
                      "batch_size": batch_size, "purpose": purpose, "created": created, "started": time.time(),
                      "served_before": [asdict(s) for s in served_before],
                      **({} if adapter is None else {"adapter": {
                          "name": adapter.name, "spec": adapter.spec.to_dict(),
                          "probes_in_one_batch": adapter.probes_in_one_batch, "trained_on": trained_on}})})

    def chunk(self, job_id: str, outcome: ChunkOutcome, z_kind: ZKind) -> None:
        if not outcome.reports and outcome.aborted is None:
            return
        rows = [{"step": r.step, "step_ms": r.step_ms, **_result_row(r.result)} for r in outcome.reports]
        aborted = outcome.aborted
        self._append({"kind": "chunk", "job_id": job_id, "z_kind": z_kind.value,
                      "fingerprint": outcome.trainable_fingerprint, "names": list(outcome.trainable_names),
                      "steps": rows, "aborted": None if aborted is None else {
                          "step": aborted.step, "seeds": list(aborted.probes.seeds), "eps": aborted.probes.eps,
                          "passes": aborted.probes.passes, "estimator": aborted.probes.estimator.value},
                      **({} if outcome.adapter_version is None else {
                          "adapter_version": asdict(outcome.adapter_version)})})

    def evaluated(self, job_id: str, step: int, metrics: EvalMetrics, weight_version: str) -> None:
        self._append({"kind": "eval", "job_id": job_id, "step": step, "metrics": metrics.to_dict(),
                      "weight_version": weight_version})

    def finished(self, job_id: str, status: str, failure: Failure | None) -> None:
        self._append({"kind": "finish", "job_id": job_id, "status": status, "finished": time.time(),
                      "failure": None if failure is None else {"kind": failure.kind.value,
                                                               "message": failure.message}})

    def served(self, segments: list[Segment]) -> None:
        """The served weights were put at ``segments`` (a reset, or the recovery after a torn pass)."""
        self._append({"kind": "served", "segments": [asdict(s) for s in segments]})

    def _append(self, record: dict) -> None:
        """On disk before it returns; :class:`JournalWriteError` if it could not be (and for every record after:
        a journal with a gap would describe weights that never were)."""
        if self.failed:
            raise JournalWriteError(self.failed)
        line = json.dumps(record, separators=(",", ":")) + "\n"
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self.failed = f"the journal {self.path} cannot be written ({exc.strerror or exc})"
            raise JournalWriteError(self.failed) from exc


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _result_row(result: StepResult) -> dict:
    return {"seeds": list(result.seeds), "loss_plus": list(result.loss_plus), "loss_minus": list(result.loss_minus),
            "projected_grads": list(result.projected_grads), "lr": result.lr, "weight_decay": result.weight_decay,
            "eps": result.eps, "estimator": result.estimator.value, "update": list(result.update),
            "adaptive": [result.adaptive.second_moment, result.adaptive.updates]}


def _result_of(row: dict) -> StepResult:
    """A row back to its result; rows written before the estimators existed are SPSA steps with MeZO's update."""
    second_moment, updates = row.get("adaptive", (0.0, 0))
    return StepResult(seeds=tuple(row["seeds"]), loss_plus=tuple(row["loss_plus"]),
                      loss_minus=tuple(row["loss_minus"]), projected_grads=tuple(row["projected_grads"]),
                      lr=row["lr"], weight_decay=row["weight_decay"], eps=row["eps"],
                      estimator=Estimator(row.get("estimator", Estimator.SPSA.value)),
                      update=tuple(row.get("update", ())), adaptive=AdaptiveState(second_moment, updates))


# -- reading ----------------------------------------------------------------------------------------------------------


def read(path: str | Path) -> JournalState:
    """The state a journal describes. A last line cut short is dropped, and cut from the file, so that what is
    appended next follows a whole record."""
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # a whole file ends with a newline: its tail is empty
    records, good_bytes = [], 0
    for number, line in enumerate(complete, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(complete) and not tail:  # the last line, cut mid-record and padded by the OS
                break
            raise JournalError(f"{path}, line {number}: not a journal record; the state folder is damaged") from None
        good_bytes += len(line) + 1
    if good_bytes != len(raw):
        logger.warning("MeZO: %s ended in a record cut short (the server stopped mid-write); dropped it", path)
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    first = records[0] if records and isinstance(records[0], dict) else {}
    if first.get("kind") != "base" or first.get("format") != FORMAT:
        raise JournalError(f"{path} is not an sglang-mezo journal")
    state = JournalState(base=records[0]["identity"], base_weight_version=records[0]["weight_version"],
                         base_model=records[0].get("model_path", ""))
    for number, record in enumerate(records[1:], start=2):
        try:
            _apply(state, record)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            kind = record.get("kind") if isinstance(record, dict) else type(record).__name__
            raise JournalError(f"{path}, line {number}: a {kind!r} record that does not fit the journal before it "
                               f"({type(exc).__name__})") from None
    for job in state.jobs.values():
        if job.status == "running":  # the server stopped during it
            job.status = "failed"
            job.failure = Failure(FailureKind.INTERRUPTED, f"the server stopped during this job; the "
                                                          f"{len(job.reports)} steps it committed are kept")
    return state


def _apply(state: JournalState, record: dict) -> None:
    kind = record["kind"]
    if kind == "job":
        adapter = record.get("adapter")
        state.jobs[record["job_id"]] = JournaledJob(
            id=record["job_id"], config=MezoConfig.from_dict(record["config"]),
            objective=Objective(record["objective"]),
            batch_size=int(record["batch_size"]), purpose=record["purpose"], created=float(record["created"]),
            started=float(record["started"]), served_before=[Segment(**s) for s in record["served_before"]],
            adapter=None if adapter is None else AdapterTarget(adapter["name"], LoraSpec.from_dict(adapter["spec"]),
                                                               bool(adapter.get("probes_in_one_batch", True))),
            trained_on="" if adapter is None else str(adapter.get("trained_on", "")))
    elif kind == "chunk":
        job = state.jobs[record["job_id"]]
        if job.trajectory is None:
            job.trajectory = Trajectory(z_kind=ZKind(record["z_kind"]), trainable_fingerprint=record["fingerprint"],
                                        trainable_names=list(record["names"]), config=job.config.to_dict(),
                                        base_model=state.base_model,
                                        adapter=None if job.adapter is None else job.adapter.spec.to_dict())
        for row in record["steps"]:
            result = _result_of(row)
            job.trajectory.append(row["step"], result)
            job.reports.append(StepReport(row["step"], result, row["step_ms"]))
        if record["aborted"] is not None:
            a = record["aborted"]
            job.trajectory.append_aborted(a["step"], AbortedProbes(tuple(a["seeds"]), a["eps"], a["passes"],
                                                                   Estimator(a.get("estimator", "spsa"))))
        if job.adapter is not None:  # the base never carries an adapter's steps
            if record.get("adapter_version") is not None:
                job.adapter_version = AdapterVersion(**record["adapter_version"])
        elif not any(s.job_id == job.id and s.records is None for s in state.served):
            state.served.append(Segment(job.id))
    elif kind == "eval":
        state.jobs[record["job_id"]].evals.append((record["step"], EvalMetrics(**record["metrics"]),
                                                   record["weight_version"]))
    elif kind == "finish":
        job = state.jobs[record["job_id"]]
        job.status, job.finished = record["status"], float(record["finished"])
        failure = record["failure"]
        job.failure = None if failure is None else Failure(FailureKind(failure["kind"]), failure["message"])
    elif kind == "served":
        segments = [Segment(**s) for s in record["segments"]]
        for segment in segments:
            if segment.job_id not in state.jobs:
                raise KeyError(segment.job_id)
        state.served = segments
    else:
        raise ValueError(f"unknown record kind {kind!r}")
