"""The MeZO step inside SGLang's scheduler process: chunks of steps, restores and saves of the served weights.

A chunk of steps is handled on the scheduler thread between batches, as one atomic unit with respect to user
traffic:

1. ``pause_generation(retract)``: running requests go back to the waiting queue and their KV is freed, so no user
   request is ever computed with perturbed weights; requests that were mid-decode resume afterwards with the KV of
   their prompt and generated tokens recomputed under the committed weights (tokens generated before the commit
   stay as they were: our policy for in-flight requests at a commit);
2. the steps, each :func:`sglang_mezo.core.run.run_step`: perturb, score, perturb, score, commit, with SGLang's own
   forward (:mod:`.scoring`);
3. a device fence (``SchedulerServing.fence``: on a GPU, SGLang's forward streams wait for our last pass) and
   ``flush_cache``: no prefix computed with the old weights can be served again;
4. ``continue_generation`` (unless the engine had been paused by someone else), and queued requests are served
   before the next chunk arrives.

A restore (reset to the base weights, or recovery after a weight pass failed part-way) is the same kind of unit:
the trainable tensors are re-read from the checkpoint on disk and the given history is replayed exactly, which
reproduces the weights bit for bit (no model reload).

Tensor parallel: every rank runs these handlers on the same message and agrees with the others at every pass,
forward and step end (:mod:`.agreement`); the reply, which only rank 0 sends, speaks for all ranks.

Data parallel (``--dp-size N``): every replica gets every message too (SGLang's DP controller sends control
messages to all). A step's batch is split between them (:func:`~sglang_mezo.core.shards.shard_of`); each replica
scores its shard under every probe, takes the probe off, and the replicas exchange their (examples, per-probe
losses) in one all-gather; every replica combines the same rows into the same losses, so each computes the same
coefficients and applies the same commit pass: identical weights, bit for bit, with only scalars exchanged. The
ranks of all replicas agree at every pass as TP ranks do, so a failure anywhere stops the step everywhere at the
same pass. Each replica's TP rank 0 replies; the HTTP process checks that the replies agree.

Everything the handler asks of SGLang goes through :class:`.serving.SchedulerServing`.

Every outcome is a reply, never an exception: an exception escaping a handler would kill the scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from sglang_mezo.checkpoint import CheckpointError, assemble, load_pieces, plan_reads, write_parts
from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.estimators import AdaptiveState
from sglang_mezo.core.lora import ServedAdapter
from sglang_mezo.core.master import MasterWeights, Placement, Precision
from sglang_mezo.core.objectives import batch_loss_fn
from sglang_mezo.core.params import ParamSelection, TrainablePiece, TrainableSet, weights_digest
from sglang_mezo.core.run import run_step
from sglang_mezo.core.shards import combine, shard_of
from sglang_mezo.core.spsa import AbortedProbes, InconsistentWeightsError, LossFn, Reduce
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.protocol import (
    AbortedStep,
    AdapterRetired,
    ChunkOutcome,
    Failure,
    FailureKind,
    FleetJoined,
    ReplicaFingerprint,
    RestoreOutcome,
    SaveOutcome,
    StepChunk,
    StepReport,
)

from .adapters import AdapterTrainer
from .agreement import Agreement, OtherRankFailed, Verdict
from .faults import FAULT_ENV, FaultInjector
from .messages import (
    MezoAdapterRetireReqInput,
    MezoChunkReqInput,
    MezoFingerprintReqInput,
    MezoFleetReqInput,
    MezoReqOutput,
    MezoRestoreReqInput,
    MezoSaveReqInput,
)
from .serving import SchedulerServing

logger = logging.getLogger(__name__)

_DISABLED = ("training is disabled: an earlier weight update failed part-way and the weights have not been "
             "restored (POST /mezo/reset)")


def _no_examples() -> float:
    """The loss of a replica's empty shard (a batch smaller than the replicas): it weighs nothing in the sum."""
    return 0.0


class MezoSchedulerHandler:
    def __init__(self, serving: SchedulerServing, *, faults: FaultInjector | None = None,
                 master: str = "none") -> None:
        self.serving = serving
        self._faults = faults
        self._ranks: Agreement | None = None
        self._params: dict[ParamSelection, TrainableSet] = {}
        self._master = master
        self._masters: MasterWeights | None = None
        """fp32 masters of half-precision trainable weights, one per block whichever set moves it (made with the
        first trainable set of a half-precision model, when ``--mezo-master`` asks for them)."""
        self.inconsistent = False
        """Latched when a weight pass failed part-way: no training until a restore succeeds."""
        self.adapters = AdapterTrainer(serving, faults=lambda: self.faults)

    @property
    def faults(self) -> FaultInjector:
        if self._faults is None:  # the rank is known once the model is loaded
            self._faults = FaultInjector(os.environ.get(FAULT_ENV), self.serving.place.rank)
        return self._faults

    @property
    def ranks(self) -> Agreement:
        """Every rank that moves in lockstep with this one: its TP group, or every replica's ranks."""
        if self._ranks is None:
            self._ranks = self.serving.agreement()
        return self._ranks

    def params_for(self, selection: ParamSelection) -> TrainableSet:
        if selection not in self._params:
            engine = self.serving.engine
            pieces = engine.trainable_pieces()
            masters = self._masters_for(pieces)
            if masters is not None:
                # a new master's truth is the base checkpoint (fp32, or whatever it holds), not the rounded served
                # weights: masters are only ever made by reading it (a block no set had yet was never moved, so it
                # still is the base), before the set attaches them; a failed read leaves no master half-made
                chosen = set(selection.select(dict.fromkeys(p.name for p in pieces), engine.num_layers))
                fresh = [p for p in pieces if p.name in chosen and not masters.has(p.data)]
                load_pieces(plan_reads(self.serving.model_path, fresh), self._load_into_master)
            self._params[selection] = TrainableSet.from_pieces(pieces, selection, engine.num_layers, masters=masters)
            if masters is not None:
                logger.info("MeZO: fp32 masters (%s) hold %.1f MiB on this rank (4 bytes per trainable parameter)",
                            self._master, masters.nbytes / 2**20)
        return self._params[selection]

    def _masters_for(self, pieces: list[TrainablePiece]) -> MasterWeights | None:
        precision = Precision.of(pieces[0].data.dtype if pieces else torch.float32, self._master)
        if not precision.half:
            return None
        if precision.refusal:  # the HTTP side refuses first; this guards the weights whatever sends a chunk
            raise ValueError(precision.refusal)
        if self._masters is None:
            self._masters = MasterWeights(Placement(self._master))
        return self._masters

    # -- a chunk of steps ----------------------------------------------------------------------------------------

    def handle(self, req: MezoChunkReqInput) -> MezoReqOutput:
        chunk = req.chunk
        if chunk.adapter is not None:  # the base weights do not move: no pause, no agreement on them
            return MezoReqOutput(outcome=self.adapters.handle(chunk))
        failure = self._prepare(chunk)
        # All ranks agree before any collective runs: a rank that skipped the steps would strand the others. A
        # rank whose weights are inconsistent makes every rank say so, so that rank 0's reply leads to a restore.
        verdict = self._agree(failure is None, in_step=False)
        if not verdict.ok:
            self.inconsistent = not verdict.consistent
            failure = failure or Failure(FailureKind.TRAINING_DISABLED if self.inconsistent else FailureKind.INVALID,
                                         "bad chunk on another rank", elsewhere=True)
            return MezoReqOutput(outcome=ChunkOutcome(failure=failure, weights_consistent=not self.inconsistent))
        params = self.params_for(chunk.config.selection)
        reports: list[StepReport] = []
        aborted: AbortedStep | None = None
        started = time.perf_counter()
        with self._paused(flush=lambda: bool(reports) or aborted is not None or self.inconsistent):
            state = chunk.adaptive
            for step, batch in zip(chunk.steps, chunk.batches, strict=True):
                report, aborted, failure = self._step(chunk, params, step, batch, state)
                if report is None:
                    break
                reports.append(report)
                state = report.result.adaptive
            version = None if self.inconsistent else chunk.weight_version_after(reports, aborted)
            if version is not None:
                self._label(version)
        logger.info("MeZO job %s: %d step(s) in %.1f ms", chunk.job_id, len(reports),
                    1e3 * (time.perf_counter() - started))
        return MezoReqOutput(outcome=ChunkOutcome(
            reports=tuple(reports), aborted=aborted, failure=failure, weights_consistent=not self.inconsistent,
            trainable_fingerprint=params.fingerprint(), trainable_names=tuple(sorted(params.manifest)),
            weight_version=version))

    def _prepare(self, chunk: StepChunk) -> Failure | None:
        """Everything a chunk needs before the weights move, or why it cannot run."""
        if self.inconsistent:
            return Failure(FailureKind.TRAINING_DISABLED, _DISABLED)
        if chunk.config.shards != self.serving.place.dp_size:
            return Failure(FailureKind.INVALID, f"the job's steps are shared between {chunk.config.shards} "
                                                f"replica(s), this server has {self.serving.place.dp_size}")
        try:
            self.params_for(chunk.config.selection)
            self.faults  # noqa: B018 - parses the fault spec now, not mid-step
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            logger.exception("MeZO job %s: bad chunk", chunk.job_id)
            return Failure(FailureKind.INVALID, f"bad chunk: {type(exc).__name__}: {exc}")
        return None

    def _step(self, chunk: StepChunk, params: TrainableSet, step: int, batch,
              state: AdaptiveState) -> tuple[StepReport | None, AbortedStep | None, Failure | None]:
        """One step, agreed between the ranks: its report, or (None, the failed step's probe passes, why)."""
        config = chunk.config
        started = time.perf_counter()
        reduce = None
        if config.shards > 1:
            batch = shard_of(batch, step, self.serving.place.dp_rank, config.shards)
            reduce = self._reduce(len(batch))
        scored = batch_loss_fn(self.serving.engine, chunk.objective, batch) if batch else _no_examples
        # a fault is injected before the forward's agreement: where a failing weight pass would be
        loss = self.faults.wrap(self._agreeing(scored), config.seed, step, params)
        abort: list[AbortedProbes] = []
        failure = None
        try:
            result = run_step(params, config, step, loss, state=state, on_abort=abort.append,
                              before_pass=self._in_step_check, reduce=reduce)
            verdict = self._agree(True, in_step=False, committed=True)
        except Exception as exc:  # noqa: BLE001 - reported; the weights are handled below
            failure = self._step_failed(chunk.job_id, exc)
            passes = abort[0].passes if abort else 0
            verdict = self._agree(False, in_step=not isinstance(exc, OtherRankFailed), passes=passes)
            if verdict.in_step:  # the others were still in the step: they stop now and meet us at its end
                verdict = self._agree(False, in_step=False, passes=passes)
        self.inconsistent = not verdict.consistent
        if verdict.ok:
            return StepReport(step, result, 1e3 * (time.perf_counter() - started)), None, None
        if self.inconsistent:
            failure = (Failure(FailureKind.WEIGHTS_INCONSISTENT, failure.message, failure.elsewhere) if failure else
                       Failure(FailureKind.WEIGHTS_INCONSISTENT, "the weights on another rank were left inconsistent",
                               elsewhere=True))
        failure = failure or Failure(FailureKind.STEP_FAILED, f"the step failed on another {self._other}",
                                     elsewhere=True)
        aborted = AbortedStep(step, abort[0]) if abort and not self.inconsistent else None
        return None, aborted, failure

    @property
    def _other(self) -> str:
        return "replica" if self.serving.place.dp_size > 1 else "tensor-parallel rank"

    def _reduce(self, examples: int) -> Reduce:
        """This replica's shard of ``examples`` combined with every other's: one all-gather of (examples, L+…,
        L-…) per step; the rows of TP ranks other than 0 repeat their replica's and are left out."""
        place = self.serving.place

        def reduce(loss_plus, loss_minus):
            rows = self.serving.replicas.all_gather([float(examples), *loss_plus, *loss_minus])
            totals = combine(rows[::place.tp_size])
            n = len(loss_plus)
            return totals[:n], totals[n:]

        return reduce

    def _label(self, version: str) -> None:
        """Give the served weights SGLang's weight version ``version``; called while serving is paused, so that
        each request's version spans split exactly at the change."""
        try:
            self.serving.label(version)
        except Exception:  # noqa: BLE001 - a label is bookkeeping: never let it kill the scheduler
            logger.exception("MeZO: recording the weight version %s failed", version)

    def _step_failed(self, job_id: str, exc: Exception) -> Failure:
        if isinstance(exc, InconsistentWeightsError):
            logger.exception("MeZO job %s: weights left inconsistent", job_id)
            self.inconsistent = True
            return Failure(FailureKind.WEIGHTS_INCONSISTENT, f"{type(exc).__name__}: {exc}")
        if not isinstance(exc, OtherRankFailed):
            logger.warning("MeZO job %s: step failed: %s", job_id, exc)
        return Failure(FailureKind.STEP_FAILED, f"{type(exc).__name__}: {exc}",
                       elsewhere=isinstance(exc, OtherRankFailed))

    def _in_step_check(self) -> None:
        """With more than one rank, before each weight pass (and under TP each forward): every rank says it is still
        in the step. A rank that failed answers "no" here instead of leaving the others in a collective, and all
        stop at the same pass."""
        if self.ranks.size > 1 and not self._agree(True, in_step=True).ok:
            raise OtherRankFailed(f"the step failed on another {self._other}")

    def _agreeing(self, loss: LossFn) -> LossFn:
        """``loss``, checked first under TP, whose forwards are collectives. A replica's forward is its own: a
        replica that failed is met at the next pass's check instead (one forward later, 28 bytes fewer each)."""
        if self.serving.place.tp_size == 1:
            return loss

        def agreed() -> float:
            self._in_step_check()
            return loss()

        return agreed

    def _agree(self, ok: bool, *, in_step: bool, passes: int = 0, committed: bool = False) -> Verdict:
        return self.ranks.agree(ok, in_step=in_step, consistent=not self.inconsistent, passes=passes,
                                committed=committed)

    def _all_ranks_ok(self, ok: bool) -> bool:
        return self._agree(ok, in_step=False).ok

    # -- restore -------------------------------------------------------------------------------------------------

    def restore(self, req: MezoRestoreReqInput) -> MezoReqOutput:
        """Re-read every tensor any job may have moved from the checkpoint, then replay ``req.history`` exactly."""
        started = time.perf_counter()
        with self._paused(flush=lambda: True):
            outcome = self._restore(req.history, lambda: self._label(req.weight_version))
        if outcome.failure is None:
            outcome = dataclasses.replace(outcome, message=f"{outcome.message} in {time.perf_counter() - started:.2f} "
                                                           "s", weight_version=req.weight_version)
            logger.info("MeZO: %s", outcome.message)
        return MezoReqOutput(outcome=outcome)

    def restore_at_launch(self, history: tuple[Trajectory, ...], base_version: str) -> None:
        """Before the scheduler serves anything: put the weights at the journal's served history (SGLang's weight
        version was already set to its label at launch). If that fails, the weights are labelled ``base_version``
        again (they are the base's, or at no known state) and training is off until a reset succeeds."""
        outcome = self._restore(history, lambda: None)
        self.serving.fence()  # queued outside the event loop's stream: see SchedulerServing.fence
        if outcome.failure is None:
            logger.info("MeZO: replayed the journal at launch: %s", outcome.message)
            return
        logger.error("MeZO: the journal's served history could not be replayed at launch: %s; training is off "
                     "until POST /mezo/reset succeeds", outcome.failure.message)
        self.inconsistent = True
        self._label(base_version)

    def _restore(self, history: tuple[Trajectory, ...], label: Callable[[], None]) -> RestoreOutcome:
        """The base weights, re-read, with ``history`` replayed exactly (every rank agreeing before and after)."""
        failure = None
        try:
            targets = [self.params_for(MezoConfig.from_dict(t.config).selection) for t in history]
            for trajectory, params in zip(history, targets, strict=True):
                trajectory.check_compatible(params)
            moved = self._movable_pieces()
            plan = plan_reads(self.serving.model_path, moved)  # checked before touching weights
        except CheckpointError as exc:
            failure = Failure(FailureKind.CHECKPOINT, f"cannot re-read the base checkpoint: {exc}")
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            failure = Failure(FailureKind.INVALID, f"bad history: {type(exc).__name__}: {exc}")
        if not self._all_ranks_ok(failure is None):
            failure = failure or Failure(FailureKind.INVALID, "bad history on another rank", elsewhere=True)
            return RestoreOutcome(failure=failure, weights_consistent=not self.inconsistent)
        try:
            copied = load_pieces(plan, None if self._masters is None else self._load_into_master)
            steps = sum(t.replay(p, exact=True) for t, p in zip(history, targets, strict=True))
            label()
            ok = True
        except Exception as exc:  # noqa: BLE001 - the weights are now at no known state
            logger.exception("MeZO: restore failed")
            failure = Failure(FailureKind.WEIGHTS_INCONSISTENT, f"restore failed: {type(exc).__name__}: {exc}")
            ok = False
        ok = self._all_ranks_ok(ok)
        self.inconsistent = not ok
        if not ok:
            failure = failure or Failure(FailureKind.WEIGHTS_INCONSISTENT,
                                         "restore failed on another rank", elsewhere=True)
            return RestoreOutcome(failure=failure, weights_consistent=False)
        return RestoreOutcome(message=f"re-read {copied} elements of {len({p.name for p in moved})} tensors from the "
                                      f"checkpoint and replayed {steps} step(s)")

    # -- save ----------------------------------------------------------------------------------------------------

    def save(self, req: MezoSaveReqInput) -> MezoReqOutput:
        """Write the served weights as an HF checkpoint: each rank writes its trainable pieces, rank 0 pastes them
        into the base checkpoint's tensors. Runs on the scheduler thread, so the weights cannot change meanwhile.
        Under data parallelism replica 0's ranks write (every replica holds the same weights); the others wait at
        the same agreement, so no replica serves a later step before the files are written."""
        parts = Path(req.path) / ".mezo-parts"
        failure = None
        started = time.perf_counter()
        writes = self.serving.place.dp_rank == 0
        if self.inconsistent:
            failure = Failure(FailureKind.TRAINING_DISABLED,
                              "the served weights are at no committed step: reset them first")
        elif writes:
            try:
                read = None if self._masters is None else (lambda piece: self._masters.master_of(piece.data))
                write_parts(parts / f"rank{self.serving.tp_rank}.safetensors", self._movable_pieces(), read)
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                logger.exception("MeZO: writing the trainable tensors failed")
                failure = Failure(FailureKind.CHECKPOINT, f"{type(exc).__name__}: {exc}")
        if not self._all_ranks_ok(failure is None):  # also a barrier: every rank's parts are on disk now
            failure = failure or Failure(FailureKind.CHECKPOINT, "writing failed on another rank", elsewhere=True)
            return MezoReqOutput(outcome=SaveOutcome(failure=failure))
        version = self.serving.weight_version()
        tensors: list[str] = []
        if writes and self.serving.tp_rank == 0:  # the one that replies for the replica that wrote
            try:
                tensors = assemble(self.serving.model_path, req.path,
                                   sorted(parts.glob("rank*.safetensors")),
                                   dtype=torch.float32 if req.float32 else None)
                shutil.rmtree(parts, ignore_errors=True)
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                logger.exception("MeZO: assembling the checkpoint failed")
                return MezoReqOutput(outcome=SaveOutcome(failure=Failure(FailureKind.CHECKPOINT,
                                                                         f"{type(exc).__name__}: {exc}")))
        message = f"saved in {time.perf_counter() - started:.2f} s"
        logger.info("MeZO: weights %s %s to %s", version, message, req.path)
        return MezoReqOutput(outcome=SaveOutcome(weight_version=version, tensors=tuple(tensors), message=message))

    def fingerprint(self, req: MezoFingerprintReqInput) -> MezoReqOutput:
        """A digest of every weight a job can move, as this rank holds them now (byte for byte: equal on two
        replicas exactly when their weights are), computed on demand on the scheduler thread, between batches."""
        place = self.serving.place
        pieces = self.serving.engine.trainable_pieces()
        traffic = getattr(self.serving.replicas, "traffic", None)
        return MezoReqOutput(outcome=ReplicaFingerprint(
            dp_rank=place.dp_rank, tp_rank=place.tp_rank, digest=weights_digest(pieces),
            tensors=len({p.name for p in pieces}), weight_version=self.serving.weight_version(),
            consistent=not self.inconsistent, exchanged_bytes=traffic.payload_bytes if traffic else 0,
            exchanges=traffic.collectives if traffic else 0))

    def join_fleet(self, req: MezoFleetReqInput) -> MezoReqOutput:
        """Meet the fleet's other servers' scheduler processes in the group the leader formed (all of them get this
        message at once); jobs from now on share their steps with every replica in it."""
        span = req.span
        try:
            place = self.serving.join_fleet(span)
        except Exception as exc:  # noqa: BLE001 - reported to the leader, which forms the group without the absent
            logger.exception("MeZO: joining the fleet's group at %s failed", span.address)
            return MezoReqOutput(outcome=FleetJoined(failure=Failure(
                FailureKind.INVALID, f"could not join the fleet's group at {span.address}: {type(exc).__name__}: "
                                     f"{exc}")))
        self._ranks = None  # the ranks that move in lockstep are the new group's
        logger.info("MeZO: replica %d of %d in the fleet's group %s", place.dp_rank, place.dp_size,
                    span.group or "(none: this server's replicas alone)")
        return MezoReqOutput(outcome=FleetJoined(dp_rank=place.dp_rank, dp_size=place.dp_size))

    # -- adapters ------------------------------------------------------------------------------------------------

    def retire_adapters(self, req: MezoAdapterRetireReqInput) -> MezoReqOutput:
        """Unload adapter versions no request uses any more; drop a finished adapter job's training state."""
        self.adapters.retire(req.lora_ids)
        if req.job_id is not None:
            self.adapters.drop(req.job_id)
        return MezoReqOutput(outcome=AdapterRetired(retired=req.lora_ids, job_id=req.job_id))

    def _load_into_master(self, piece: TrainablePiece, block: torch.Tensor) -> None:
        """A checkpoint block becomes the piece's master; the served weights are rounded from it."""
        self._masters.load(piece.data, block)
        self._masters.forget_probe()

    def _movable_pieces(self) -> list[TrainablePiece]:
        """The pieces of every trainable set built so far (each distinct block once)."""
        seen: dict[tuple, TrainablePiece] = {}
        for params in self._params.values():
            for piece in params.pieces:
                seen.setdefault((piece.name, piece.row_offset, piece.col_offset, piece.data.data_ptr()), piece)
        return list(seen.values())

    # -- serving around a unit of work ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _paused(self, flush: Callable[[], bool]) -> Iterator[None]:
        """Pause (retract) user traffic for the block; afterwards flush the prefix cache if ``flush()`` says the
        weights changed, and resume unless someone else had paused the engine."""
        was_paused = self.serving.is_paused()
        self.serving.pause()
        try:
            yield
        finally:
            try:
                self.serving.fence()  # the next user forward waits for our last pass, on the device
                if flush() and not self.serving.flush_cache():
                    # flush_cache refuses while requests are in flight; after a retract there are none, so this
                    # means a cache we cannot trust: stop training until a restore, and say so
                    logger.error("MeZO: the prefix cache could not be flushed after a weight change")
                    self.inconsistent = True
                if not was_paused:
                    self.serving.resume()
            except Exception:  # noqa: BLE001 - never let cleanup kill the scheduler
                logger.exception("MeZO: resuming serving failed")


def install(scheduler, resume: tuple[Trajectory, ...] = (), base_version: str = "", master: str = "none",
            adapters: tuple[ServedAdapter, ...] = (), replica_address: str | None = None) -> None:
    """Add the MeZO handlers to a scheduler's request dispatcher (called from the init_request_dispatcher hook, when
    the model is loaded and nothing has been served yet), after replaying ``resume`` (the journal's served
    history) onto the weights. Under ``--dp-size > 1`` this process first joins the replicas' group at
    ``replica_address`` (every replica's schedulers start together, so the rendezvous is here, at launch)."""
    from sglang.utils import TypeBasedDispatcher

    handler = MezoSchedulerHandler(SchedulerServing(scheduler, replica_address), master=master)
    handler.ranks  # noqa: B018 - forms the replicas' group now: a replica that cannot join fails its launch
    pieces = handler.serving.engine.trainable_pieces()
    precision = Precision.of(pieces[0].data.dtype if pieces else torch.float32, master)
    if precision.master_bytes_per_parameter:
        numel = sum({p.data.data_ptr(): p.data.numel() for p in pieces}.values())  # tied weights once
        logger.info("MeZO: %s weights train through fp32 masters (%s): %d more bytes per trainable parameter, "
                    "%.1f MiB on this rank if every weight trains", precision.served_dtype, master,
                    precision.master_bytes_per_parameter,
                    precision.master_bytes_per_parameter * numel / 2**20)
    if resume:
        handler.restore_at_launch(resume, base_version)
    handler.adapters.restore_at_launch(adapters)
    def signed(method: Callable[[object], MezoReqOutput]) -> Callable[[object], MezoReqOutput]:
        def answer(req) -> MezoReqOutput:
            reply = method(req)
            # the HTTP process compares the replicas' replies; in a fleet's group, by their fleet-wide number
            reply.dp_rank = handler.serving.place.dp_rank
            return reply

        return answer

    scheduler._request_dispatcher += TypeBasedDispatcher([
        (MezoChunkReqInput, signed(handler.handle)),
        (MezoRestoreReqInput, signed(handler.restore)),
        (MezoSaveReqInput, signed(handler.save)),
        (MezoAdapterRetireReqInput, signed(handler.retire_adapters)),
        (MezoFingerprintReqInput, signed(handler.fingerprint)),
        (MezoFleetReqInput, signed(handler.join_fleet)),
    ])
    scheduler._mezo_handler = handler
