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

Every outcome is a reply, never an exception: an exception escaping a handler would kill the scheduler.
"""

from __future__ import annotations

import logging
import time

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import ChoiceExample, CompletionExample, Objective, batch_loss_fn
from sglang_mezo.core.params import ParamSelection, TrainableSet
from sglang_mezo.core.spsa import InconsistentWeightsError, mezo_step
from sglang_mezo.kernels import derive_seed

from .messages import MezoChunkReqInput, MezoChunkReqOutput
from .scoring import SchedulerEngine

logger = logging.getLogger(__name__)


def example_from_wire(data: dict) -> CompletionExample | ChoiceExample:
    if "options" in data:
        return ChoiceExample(tuple(data["prompt"]), tuple(tuple(o) for o in data["options"]), int(data["label"]))
    return CompletionExample(tuple(data["prompt"]), tuple(data["completion"]))


class MezoSchedulerHandler:
    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self._engine: SchedulerEngine | None = None
        self._params: dict[ParamSelection, TrainableSet] = {}
        self.inconsistent = False
        """Latched when a weight pass failed part-way: no further training until the server is restarted."""

    @property
    def engine(self) -> SchedulerEngine:
        if self._engine is None:  # built on first use: the model is loaded by then
            self._engine = SchedulerEngine(self.scheduler)
        return self._engine

    def params_for(self, selection: ParamSelection) -> TrainableSet:
        if selection not in self._params:
            self._params[selection] = TrainableSet.from_pieces(self.engine.trainable_pieces(), selection,
                                                               self.engine.num_layers)
        return self._params[selection]

    def handle(self, req: MezoChunkReqInput) -> MezoChunkReqOutput:
        results: list[dict] = []
        error = None
        if self.inconsistent:
            error = ("training is disabled: an earlier weight update failed part-way; restart the server to serve "
                     "and train from consistent weights")
        else:
            try:
                config = MezoConfig.from_dict(req.config)
                objective = Objective(req.objective)
                params = self.params_for(config.selection)
                batches = [[example_from_wire(e) for e in batch] for batch in req.batches]
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                logger.exception("MeZO job %s: bad chunk", req.job_id)
                error = f"bad chunk: {type(exc).__name__}: {exc}"
        # Every TP rank runs this handler; the steps contain collectives. A rank that skips them while another
        # runs them would deadlock or corrupt the collectives, so all ranks agree first.
        if not self._all_ranks_ok(error is None):
            return MezoChunkReqOutput(success=False, message=error or "bad chunk on another tensor-parallel rank",
                                      inconsistent=self.inconsistent)
        s = self.scheduler
        was_paused = s._engine_paused
        started = time.perf_counter()
        try:
            self._pause()
            for step, batch in zip(req.steps, batches, strict=True):
                step_started = time.perf_counter()
                loss = batch_loss_fn(self.engine, objective, batch)
                result = mezo_step(
                    params,
                    loss,
                    [derive_seed(config.seed, step, p) for p in range(config.n_probes)],
                    eps=config.eps,
                    lr=config.lr_at(step),
                    weight_decay=config.weight_decay,
                    kind=config.z_kind,
                )
                results.append({"step": step, **result.to_dict(),
                                "step_ms": 1e3 * (time.perf_counter() - step_started)})
            return MezoChunkReqOutput(success=True, results=results, **self._trainable_header(params))
        except InconsistentWeightsError as exc:
            logger.exception("MeZO job %s: weights left inconsistent", req.job_id)
            self.inconsistent = True  # also makes the cleanup below flush: cached KV may be from the moved weights
            return MezoChunkReqOutput(success=False, message=str(exc), results=results, inconsistent=True,
                                      **self._trainable_header(params))
        except Exception as exc:  # noqa: BLE001 - the weights are at the last committed step; report, don't crash
            logger.warning("MeZO job %s: step failed: %s", req.job_id, exc)
            return MezoChunkReqOutput(success=False, message=f"{type(exc).__name__}: {exc}", results=results,
                                      **self._trainable_header(params))
        finally:
            try:
                if (results or self.inconsistent) and not s.flush_cache(empty_cache=False):
                    logger.error("MeZO: the prefix cache could not be flushed after a weight update")
                if not was_paused:
                    self._continue()
            except Exception:  # noqa: BLE001 - never let cleanup kill the scheduler
                logger.exception("MeZO: cleanup after job %s failed", req.job_id)
            logger.info("MeZO job %s: %d step(s) in %.1f ms", req.job_id, len(results),
                        1e3 * (time.perf_counter() - started))

    def _all_ranks_ok(self, ok: bool) -> bool:
        if self.engine_tp_size() == 1:
            return ok
        import torch
        import torch.distributed as dist
        from sglang.srt.distributed import get_tp_group

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=get_tp_group().cpu_group)
        return bool(flag.item())

    def engine_tp_size(self) -> int:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().tp_size)

    @staticmethod
    def _trainable_header(params: TrainableSet) -> dict:
        return {"trainable_fingerprint": params.fingerprint(), "trainable_names": sorted(params.manifest)}

    def _pause(self) -> None:
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        self.scheduler.pause_generation(PauseGenerationReqInput(mode="retract"))
        # the overlap scheduler may still have a forward in flight on a GPU stream: let it finish first
        stream = getattr(self.scheduler, "forward_stream", None)
        if stream is not None and hasattr(stream, "synchronize"):
            stream.synchronize()

    def _continue(self) -> None:
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput

        self.scheduler.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False))


def install(scheduler) -> None:
    """Add the MeZO handler to a scheduler's request dispatcher (called from the init_request_dispatcher hook)."""
    from sglang.utils import TypeBasedDispatcher

    handler = MezoSchedulerHandler(scheduler)
    scheduler._request_dispatcher += TypeBasedDispatcher([(MezoChunkReqInput, handler.handle)])
    scheduler._mezo_handler = handler
