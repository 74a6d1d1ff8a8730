"""The MeZO step inside SGLang's scheduler process.

A chunk of steps is handled on the scheduler thread between batches, as one atomic unit with respect to user
traffic:

1. ``pause_generation(retract)``: running requests go back to the waiting queue and their KV is freed, so no user
   request is ever computed with perturbed weights; requests that were mid-decode resume afterwards with the KV of
   their prompt and generated tokens recomputed under the committed weights (tokens generated before the commit
   stay as they were: our policy for in-flight requests at a commit);
2. the steps: perturb, score, perturb, score, commit, with SGLang's own forward (:mod:`.scoring`);
3. ``flush_cache``: no prefix computed with the old weights can be served again;
4. ``continue_generation`` (unless the engine had been paused by someone else), and queued requests are served
   before the next chunk arrives.

A restore (reset to the base weights, or recovery after a weight pass failed part-way) is the same kind of unit:
the trainable tensors are re-read from the checkpoint on disk and the given history is replayed exactly, which
reproduces the weights bit for bit (no model reload).

Tensor parallel: every rank runs these handlers on the same message, and the forward passes inside a step are
collectives. So ranks agree before each forward (a rank that failed in a weight pass joins that agreement with
"no" instead of stranding the others in the forward's all-reduce) and at the end of a chunk on whether every
rank's weights are still consistent; the reply, which only rank 0 sends, speaks for all ranks.

Every outcome is a reply, never an exception: an exception escaping a handler would kill the scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from sglang_mezo.checkpoint import assemble, load_pieces, plan_reads, write_parts
from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import Objective, batch_loss_fn
from sglang_mezo.core.params import ParamSelection, TrainablePiece, TrainableSet
from sglang_mezo.core.spsa import AbortedProbes, InconsistentWeightsError, LossFn, mezo_step
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.jobs.executor import example_from_wire, weight_version_label
from sglang_mezo.kernels import derive_seed, zaxpy_

from .messages import MezoChunkReqInput, MezoReqOutput, MezoRestoreReqInput, MezoSaveReqInput
from .scoring import SchedulerEngine

logger = logging.getLogger(__name__)

FAULT_ENV = "SGLANG_MEZO_INJECT_FAULT"
"""Testing only: comma-separated ``<kind>@[<seed>/]<step>:<call>[#<tp rank>]`` entries, each making step ``step``
fail once per server (of the first job with that seed, or of any job), just before its loss call ``call``
(1-based), that is after the weight pass that precedes that call, on every TP rank or only on the one given.
``raise`` raises, ``nan`` returns NaN, ``torn`` moves part of the trainable tensors (as a weight pass that died
half-way would) and raises :class:`InconsistentWeightsError`."""


class OtherRankFailed(RuntimeError):
    """Another tensor-parallel rank failed; this rank stops the step with it."""


class _Verdict(NamedTuple):
    ok: bool
    in_step: bool
    consistent: bool


class _FaultInjector:
    def __init__(self, spec: str | None, tp_rank: int) -> None:
        self.pending: dict[tuple[int | None, int], tuple[str, int]] = {}  # (seed, step) -> (kind, loss call)
        for entry in filter(None, (spec or "").split(",")):
            what, _, rank = entry.strip().partition("#")
            kind, _, where = what.partition("@")
            seed, _, where = where.rpartition("/")
            step, _, call = where.partition(":")
            if kind not in ("raise", "nan", "torn"):
                raise ValueError(f"{FAULT_ENV}: {entry!r}: the kind must be raise, nan or torn")
            if not rank or int(rank) == tp_rank:
                self.pending[(int(seed) if seed else None, int(step))] = (kind, int(call))

    def wrap(self, loss: LossFn, seed: int, step: int, params: TrainableSet) -> LossFn:
        key = (seed, step) if (seed, step) in self.pending else (None, step)
        if key not in self.pending:
            return loss
        kind, fail_at = self.pending.pop(key)  # once per server
        calls = 0

        def faulty() -> float:
            nonlocal calls
            calls += 1
            if calls != fail_at:
                return loss()
            logger.warning("MeZO: injecting a %r fault at step %d, loss call %d (%s)", kind, step, calls, FAULT_ENV)
            if kind == "nan":
                return float("nan")
            if kind == "torn":
                half = params.targets[: max(1, len(params.targets) // 2)]
                zaxpy_(half, [12345], [1e-2], kind=MezoConfig().z_kind)
                raise InconsistentWeightsError("injected: a weight pass died half-way")
            raise RuntimeError("injected: the scorer failed")

        return faulty


class MezoSchedulerHandler:
    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self._engine: SchedulerEngine | None = None
        self._params: dict[ParamSelection, TrainableSet] = {}
        self._faults: _FaultInjector | None = None
        self.inconsistent = False
        """Latched when a weight pass failed part-way: no training until a restore succeeds."""

    @property
    def engine(self) -> SchedulerEngine:
        if self._engine is None:  # built on first use: the model is loaded by then
            self._engine = SchedulerEngine(self.scheduler)
        return self._engine

    @property
    def faults(self) -> _FaultInjector:
        if self._faults is None:
            self._faults = _FaultInjector(os.environ.get(FAULT_ENV), self.engine.tp_rank)
        return self._faults

    def params_for(self, selection: ParamSelection) -> TrainableSet:
        if selection not in self._params:
            self._params[selection] = TrainableSet.from_pieces(self.engine.trainable_pieces(), selection,
                                                               self.engine.num_layers)
        return self._params[selection]

    # -- a chunk of steps ----------------------------------------------------------------------------------------

    def handle(self, req: MezoChunkReqInput) -> MezoReqOutput:
        error = None
        if self.inconsistent:
            error = ("training is disabled: an earlier weight update failed part-way and the weights have not been "
                     "restored (POST /mezo/reset)")
        else:
            try:
                config = MezoConfig.from_dict(req.config)
                objective = Objective(req.objective)
                params = self.params_for(config.selection)
                batches = [[example_from_wire(e) for e in batch] for batch in req.batches]
                faults = self.faults
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                logger.exception("MeZO job %s: bad chunk", req.job_id)
                error = f"bad chunk: {type(exc).__name__}: {exc}"
        # All ranks agree before any collective runs: a rank that skipped the steps would strand the others. A
        # rank whose weights are inconsistent makes every rank say so, so that rank 0's reply leads to a restore.
        verdict = self._agree(error is None, in_step=False)
        if not verdict.ok:
            self.inconsistent = not verdict.consistent
            return MezoReqOutput(success=False, message=error or "bad chunk on another tensor-parallel rank",
                                 inconsistent=self.inconsistent)
        results: list[dict] = []
        aborted: dict | None = None
        started = time.perf_counter()
        with self._paused(flush=lambda: bool(results) or aborted is not None or self.inconsistent):
            for step, batch in zip(req.steps, batches, strict=True):
                step_started = time.perf_counter()
                # a fault is injected before the forward's agreement: where a failing weight pass would be
                loss = faults.wrap(self._agreeing(batch_loss_fn(self.engine, objective, batch)), config.seed, step,
                                   params)
                abort: list[AbortedProbes] = []
                try:
                    result = mezo_step(
                        params,
                        loss,
                        [derive_seed(config.seed, step, p) for p in range(config.n_probes)],
                        eps=config.eps,
                        lr=config.lr_at(step),
                        weight_decay=config.weight_decay,
                        kind=config.z_kind,
                        on_abort=abort.append,
                        before_pass=self._in_step_check,
                    )
                    verdict = self._agree(True, in_step=False, committed=True)
                except Exception as exc:  # noqa: BLE001 - reported; the weights are handled below
                    error = self._step_failed(req.job_id, exc)
                    passes = abort[0].passes if abort else 0
                    verdict = self._agree(False, in_step=not isinstance(exc, OtherRankFailed), passes=passes)
                    if verdict.in_step:  # the others were still in the step: they stop now and meet us at its end
                        verdict = self._agree(False, in_step=False, passes=passes)
                self.inconsistent = not verdict.consistent
                if not verdict.ok:
                    error = error or ("the weights on another tensor-parallel rank were left inconsistent"
                                      if self.inconsistent else "the step failed on another tensor-parallel rank")
                    if abort and not self.inconsistent:
                        a = abort[0]
                        aborted = {"step": step, "seeds": list(a.seeds), "eps": a.eps, "passes": a.passes}
                    break
                results.append({"step": step, **result.to_dict(),
                                "step_ms": 1e3 * (time.perf_counter() - step_started)})
            version = None
            if (results or aborted) and not self.inconsistent:
                version = weight_version_label(req.job_id, results[-1]["step"] + 1 if results else req.steps[0],
                                               aborted is not None)
                self._label(version)
        logger.info("MeZO job %s: %d step(s) in %.1f ms", req.job_id, len(results),
                    1e3 * (time.perf_counter() - started))
        return MezoReqOutput(success=error is None, message=error or "", results=results, aborted=aborted,
                             inconsistent=self.inconsistent, weight_version=version,
                             **self._trainable_header(params))

    def _label(self, version: str) -> None:
        """Give the served weights SGLang's weight version ``version``; called while serving is paused, so that
        each request's version spans split exactly at the change."""
        try:
            self.scheduler.record_weight_version_change(version)
        except Exception:  # noqa: BLE001 - a label is bookkeeping: never let it kill the scheduler
            logger.exception("MeZO: recording the weight version %s failed", version)

    def _step_failed(self, job_id: str, exc: Exception) -> str:
        if isinstance(exc, InconsistentWeightsError):
            logger.exception("MeZO job %s: weights left inconsistent", job_id)
            self.inconsistent = True
        elif not isinstance(exc, OtherRankFailed):
            logger.warning("MeZO job %s: step failed: %s", job_id, exc)
        return f"{type(exc).__name__}: {exc}"

    def _in_step_check(self) -> None:
        """Under TP, before each weight pass and each forward: every rank says it is still in the step. A rank that
        failed answers "no" here instead of leaving the others in a collective, and all stop at the same pass."""
        if self.engine.tp_size > 1 and not self._agree(True, in_step=True).ok:
            raise OtherRankFailed("the step failed on another tensor-parallel rank")

    def _agreeing(self, loss: LossFn) -> LossFn:
        def agreed() -> float:
            self._in_step_check()
            return loss()

        return agreed

    # -- restore -------------------------------------------------------------------------------------------------

    def restore(self, req: MezoRestoreReqInput) -> MezoReqOutput:
        """Re-read every tensor any job may have moved from the checkpoint, then replay ``req.history`` exactly."""
        error = None
        try:
            history = [Trajectory.from_dict(d) for d in req.history]
            targets = [self.params_for(MezoConfig.from_dict(t.config).selection) for t in history]
            for trajectory, params in zip(history, targets, strict=True):
                trajectory.check_compatible(params)
            moved = self._movable_pieces()
            plan = plan_reads(self.scheduler.server_args.model_path, moved)  # checked before touching weights
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            error = f"bad history: {type(exc).__name__}: {exc}"
        if not self._all_ranks_ok(error is None):
            return MezoReqOutput(success=False, message=error or "bad history on another tensor-parallel rank",
                                 inconsistent=self.inconsistent)
        started = time.perf_counter()
        with self._paused(flush=lambda: True):
            try:
                copied = load_pieces(plan)
                steps = sum(t.replay(p, exact=True) for t, p in zip(history, targets, strict=True))
                self._label(req.weight_version)
                ok = True
            except Exception as exc:  # noqa: BLE001 - the weights are now at no known state
                logger.exception("MeZO: restore failed")
                error = f"restore failed: {type(exc).__name__}: {exc}"
                ok = False
            ok = self._all_ranks_ok(ok)
            self.inconsistent = not ok
        if not ok:
            return MezoReqOutput(success=False, inconsistent=True,
                                 message=error or "restore failed on another tensor-parallel rank")
        message = (f"re-read {copied} elements of {len({p.name for p in moved})} tensors from the checkpoint and "
                   f"replayed {steps} step(s) in {time.perf_counter() - started:.2f} s")
        logger.info("MeZO: %s", message)
        return MezoReqOutput(success=True, message=message, weight_version=req.weight_version)

    # -- save ----------------------------------------------------------------------------------------------------

    def save(self, req: MezoSaveReqInput) -> MezoReqOutput:
        """Write the served weights as an HF checkpoint: each rank writes its trainable pieces, rank 0 pastes them
        into the base checkpoint's tensors. Runs on the scheduler thread, so the weights cannot change meanwhile."""
        from sglang.srt.runtime_context import get_serving

        parts = Path(req.path) / ".mezo-parts"
        error = None
        started = time.perf_counter()
        try:
            if self.inconsistent:
                raise InconsistentWeightsError("the served weights are at no committed step: reset them first")
            write_parts(parts / f"rank{self.engine.tp_rank}.safetensors", self._movable_pieces())
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            logger.exception("MeZO: writing the trainable tensors failed")
            error = f"{type(exc).__name__}: {exc}"
        if not self._all_ranks_ok(error is None):  # also a barrier: every rank's parts are on disk now
            return MezoReqOutput(success=False, message=error or "writing failed on another tensor-parallel rank")
        info = {"weight_version": str(get_serving().weight_version)}
        if self.engine.tp_rank == 0:  # the one that replies
            try:
                info["tensors"] = assemble(self.scheduler.server_args.model_path, req.path,
                                           sorted(parts.glob("rank*.safetensors")))
                shutil.rmtree(parts, ignore_errors=True)
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                logger.exception("MeZO: assembling the checkpoint failed")
                return MezoReqOutput(success=False, message=f"{type(exc).__name__}: {exc}")
        message = f"saved in {time.perf_counter() - started:.2f} s"
        logger.info("MeZO: weights %s %s to %s", info["weight_version"], message, req.path)
        return MezoReqOutput(success=True, message=message, info=info)

    def _movable_pieces(self) -> list[TrainablePiece]:
        """The pieces of every trainable set built so far (each distinct block once)."""
        seen: dict[tuple, TrainablePiece] = {}
        for params in self._params.values():
            for piece in params.pieces:
                seen.setdefault((piece.name, piece.row_offset, piece.col_offset, piece.data.data_ptr()), piece)
        return list(seen.values())

    # -- helpers -------------------------------------------------------------------------------------------------

    def _all_ranks_ok(self, ok: bool) -> bool:
        return self._agree(ok, in_step=False).ok

    def _agree(self, ok: bool, *, in_step: bool, passes: int = 0, committed: bool = False) -> _Verdict:
        """One all-reduce over the TP ranks. ``ok``: all ranks are fine. ``in_step``: tells a rank that failed
        mid-step whether the others were still inside the step (at a pass's or a forward's agreement: they will
        stop and meet it at the step's end) or already at its end. ``consistent``: no rank's weights are at an
        unknown state, and at a step's end all ranks made the same probe passes (``passes``) and all committed or
        none did (``committed``) — otherwise their shards no longer belong to one model."""
        local = _Verdict(ok, in_step, not self.inconsistent)
        if self.engine.tp_size == 1:
            return local
        import torch
        import torch.distributed as dist
        from sglang.srt.distributed import get_tp_group

        flags = torch.tensor([int(ok), int(in_step), int(local.consistent), passes, -passes, int(committed),
                              -int(committed)], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=get_tp_group().cpu_group)
        all_ok, all_in_step, consistent, min_passes, neg_max_passes, min_committed, neg_max_committed = flags.tolist()
        if not all_in_step:  # a step's end: the ranks' passes and commits are comparable
            consistent = consistent and min_passes == -neg_max_passes and min_committed == -neg_max_committed
        return _Verdict(bool(all_ok), bool(all_in_step), bool(consistent))

    @staticmethod
    def _trainable_header(params: TrainableSet) -> dict:
        return {"trainable_fingerprint": params.fingerprint(), "trainable_names": sorted(params.manifest)}

    @contextlib.contextmanager
    def _paused(self, flush: Callable[[], bool]) -> Iterator[None]:
        """Pause (retract) user traffic for the block; afterwards flush the prefix cache if ``flush()`` says the
        weights changed, and resume unless someone else had paused the engine."""
        was_paused = self.scheduler._engine_paused
        self.pause()
        try:
            yield
        finally:
            try:
                if flush() and not self.scheduler.flush_cache(empty_cache=False):
                    # flush_cache refuses while requests are in flight; after a retract there are none, so this
                    # means a cache we cannot trust: stop training until a restore, and say so
                    logger.error("MeZO: the prefix cache could not be flushed after a weight change")
                    self.inconsistent = True
                if not was_paused:
                    self.resume()
            except Exception:  # noqa: BLE001 - never let cleanup kill the scheduler
                logger.exception("MeZO: resuming serving failed")

    def pause(self) -> None:
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        self.scheduler.pause_generation(PauseGenerationReqInput(mode="retract"))
        # the overlap scheduler may still have a forward in flight on a GPU stream: let it finish first
        stream = getattr(self.scheduler, "forward_stream", None)
        if stream is not None and hasattr(stream, "synchronize"):
            stream.synchronize()

    def resume(self) -> None:
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput

        self.scheduler.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False))


def install(scheduler) -> None:
    """Add the MeZO handlers to a scheduler's request dispatcher (called from the init_request_dispatcher hook)."""
    from sglang.utils import TypeBasedDispatcher

    handler = MezoSchedulerHandler(scheduler)
    scheduler._request_dispatcher += TypeBasedDispatcher([
        (MezoChunkReqInput, handler.handle),
        (MezoRestoreReqInput, handler.restore),
        (MezoSaveReqInput, handler.save),
    ])
    scheduler._mezo_handler = handler
