"""The step handler's view of SGLang's scheduler: the scoring engine, pausing and resuming user traffic, flushing
the prefix cache, labelling the weights, and where the base checkpoint is. Everything the handler asks of SGLang
goes through here, so the handler itself runs (and is tested) over any object with these members."""

from __future__ import annotations

from .scoring import SchedulerEngine


class SchedulerServing:
    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self._engine: SchedulerEngine | None = None

    @property
    def engine(self) -> SchedulerEngine:
        if self._engine is None:  # built on first use: the model is loaded by then
            self._engine = SchedulerEngine(self.scheduler)
        return self._engine

    @property
    def tp_rank(self) -> int:
        return self.engine.tp_rank

    @property
    def tp_size(self) -> int:
        return self.engine.tp_size

    @property
    def model_path(self) -> str:
        """The base checkpoint: resets re-read it, saves copy what did not train from it."""
        return str(self.scheduler.server_args.model_path)

    def is_paused(self) -> bool:
        """Whether someone else paused serving (then it stays paused after our unit of work)."""
        return bool(self.scheduler._engine_paused)

    def pause(self) -> None:
        """Retract the running user requests: none is computed with perturbed weights."""
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        self.scheduler.pause_generation(PauseGenerationReqInput(mode="retract"))
        # the overlap scheduler may still have a forward in flight on a GPU stream: let it finish first
        stream = getattr(self.scheduler, "forward_stream", None)
        if stream is not None and hasattr(stream, "synchronize"):
            stream.synchronize()

    def resume(self) -> None:
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput

        self.scheduler.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False))

    def flush_cache(self) -> bool:
        """Drop the prefix cache (KV of older weights); False if SGLang refused (requests in flight)."""
        return bool(self.scheduler.flush_cache(empty_cache=False))

    def label(self, version: str) -> None:
        """SGLang's weight version from now on (responses report it per span of output tokens)."""
        self.scheduler.record_weight_version_change(version)

    def weight_version(self) -> str:
        from sglang.srt.runtime_context import get_serving

        return str(get_serving().weight_version)
