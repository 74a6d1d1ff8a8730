"""The step handler's view of SGLang's scheduler: the scoring engine, pausing and resuming user traffic, flushing
the prefix cache, labelling the weights, and where the base checkpoint is. Everything the handler asks of SGLang
goes through here, so the handler itself runs (and is tested) over any object with these members."""

from __future__ import annotations

from sglang_mezo.protocol import FleetSpan

from .agreement import Agreement
from .replicas import Place, ReplicaGroup, Traffic
from .scoring import SchedulerEngine

GROUP_TIMEOUT_S = 300.0
"""How long a collective of the replicas' group may wait for a replica (the launch rendezvous included) before it
fails: a replica that died leaves the others a failed step, never a hang."""


class SchedulerServing:
    def __init__(self, scheduler, replica_address: str | None = None) -> None:
        self.scheduler = scheduler
        self._engine: SchedulerEngine | None = None
        self._replica_address = replica_address
        self._replicas: ReplicaGroup | None = None
        self._fleet: tuple[FleetSpan, ReplicaGroup] | None = None
        """The group of every scheduler process of a fleet's servers, once the leader formed one with us in it."""
        self.traffic = Traffic()

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
    def server_place(self) -> Place:
        """This process's replica and TP rank in its own server."""
        from sglang.srt.runtime_context import get_parallel

        dp_size = int(self.scheduler.server_args.dp_size or 1)
        return Place(dp_rank=int(get_parallel().dp_rank or 0) if dp_size > 1 else 0, dp_size=dp_size,
                     tp_rank=self.tp_rank, tp_size=self.tp_size)

    @property
    def place(self) -> Place:
        """This process's replica and TP rank among every replica that shares a job's steps: its server's, or in a
        fleet every server's."""
        return self.server_place if self._fleet is None else self._in(self._fleet[0])

    def _in(self, span: FleetSpan) -> Place:
        """Where this process sits in a fleet's group: this server's replicas are numbered from the span's first."""
        local = self.server_place
        return Place(dp_rank=span.first_replica + local.dp_rank, dp_size=span.replicas, tp_rank=local.tp_rank,
                     tp_size=local.tp_size)

    @property
    def replicas(self) -> ReplicaGroup | None:
        """The group of every scheduler process that shares a job's steps (None with one replica): the fleet's
        once formed, else the server's own, formed on first use, which :func:`~.handler.install` makes at launch,
        when every replica's schedulers start together."""
        if self._fleet is not None:
            return self._fleet[1]
        if self._replicas is None and self.place.dp_size > 1:
            if not self._replica_address:
                raise RuntimeError("--dp-size > 1 but no address for the replicas' group was passed")
            self._replicas = ReplicaGroup(self.place, self._replica_address, GROUP_TIMEOUT_S, traffic=self.traffic)
        return self._replicas

    def join_fleet(self, span: FleetSpan) -> Place:
        """Meet every scheduler process of the fleet's members in the group ``span`` describes (the rendezvous
        blocks until all are there, or fails after the group's timeout); the group before it is left. A span with
        no address leaves the fleet's group: this server's replicas share the steps alone again."""
        old, self._fleet = self._fleet, None
        if old is not None:
            old[1].close()
        if span.address:
            place = self._in(span)
            group = ReplicaGroup(place, span.address, GROUP_TIMEOUT_S, group_name=span.group,
                                 traffic=self.traffic)
            self._fleet = (span, group)
        return self.place

    def agreement(self) -> Agreement:
        """Agreement over every rank that must move in lockstep: all replicas' ranks, or this replica's TP group."""
        place = self.place
        if place.dp_size > 1:
            return Agreement(place.size, self.replicas.all_reduce_min)
        if place.tp_size == 1:
            return Agreement(1, None)
        import torch.distributed as dist
        from sglang.srt.distributed import get_tp_group

        group = get_tp_group().cpu_group
        return Agreement(place.size, lambda flags: dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group))

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
        self.settle()

    def settle(self) -> None:
        """Wait for the forward in flight, if any, without touching the requests (write after read). With the
        overlap scheduler the last user batch's forward may still be reading the weights, or LoRA slots, on
        forward_stream. SGLang's own barrier after a launch (the scheduler's _apply_war_barrier) may wait only for
        that forward's reads of the shared buffers, not of the weights, so wait for the whole stream before the
        first pass writes them."""
        stream = getattr(self.scheduler, "forward_stream", None)
        if stream is not None and hasattr(stream, "synchronize"):
            stream.synchronize()

    def fence(self) -> None:
        """Read after write: make every stream SGLang launches forwards on wait for the device work queued so far on
        ours (passes, restores, saves), before serving resumes. On the device, with no host sync.

        SGLang 0.5.23 orders its own weight updates (``update_weights_from_tensor`` and friends) by where they run:
        on the scheduler thread, whose current stream is the scheduler's ``schedule_stream`` (the event loop runs
        inside its stream context), while every forward launch first does ``forward_stream.wait_stream(
        schedule_stream)`` (without the overlap scheduler, forwards run on ``schedule_stream`` itself). Our chunks
        run on that thread too, passes and scoring forwards on the current stream, so that rule covers them. It
        does not cover work queued outside the event loop's stream context: the journal's replay at launch runs in
        the request dispatcher's init hook, on the default stream. So the rule is made explicit here, for both
        streams. In-place passes never reallocate a served tensor, so CUDA graphs captured on the weights'
        addresses stay valid.
        """
        current = self._device_stream()
        if current is None:
            return
        for stream in (getattr(self.scheduler, "schedule_stream", None),
                       getattr(self.scheduler, "forward_stream", None)):
            if stream is not None and stream != current:
                stream.wait_stream(current)

    def _device_stream(self):
        """The current CUDA stream, if the weights are on a CUDA device (None on a CPU server)."""
        import torch

        pieces = self.engine.trainable_pieces()
        if not pieces or pieces[0].data.device.type != "cuda":
            return None
        return torch.cuda.current_stream(pieces[0].data.device)

    @property
    def lora_manager(self):
        """SGLang's LoRA manager (None without ``--enable-lora``)."""
        return getattr(self.scheduler.tp_worker.model_runner, "lora_manager", None)

    @property
    def hf_config(self):
        return self.scheduler.model_config.hf_config

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
