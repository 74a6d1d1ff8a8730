"""Adapter jobs inside SGLang's scheduler: a LoRA adapter trained in SGLang's own LoRA pool while the base serves.

Per trained adapter the scheduler holds an fp32 master of its PEFT tensors (the truth) and ``2n`` *probe adapters*
registered with SGLang's LoRA manager only (no HTTP name reaches them). A step (:func:`~sglang_mezo.core.probes.
run_slot_step`) makes the probe adapters resident, writes probe k's ±εz into its slots as round(master ± εz), scores
the step's batch under every probe adapter in one forward batch (a request per example and probe, each with its
probe's ``lora_id``), and commits the update to the master. Nothing a user can request ever holds a probe.

After each chunk that committed steps, the master is registered with SGLang as a new adapter (a fresh ``lora_id``,
its CPU copy the master rounded to the model dtype, from which SGLang fills a slot when a request needs it); the
HTTP side then points the adapter's name at that id and retires the previous one once no request uses it. The base
weights never move, so user traffic is never retracted: a chunk only holds the scheduler thread for its steps, as
any batch does.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sglang_mezo.core.lora import LoraSpec, ModelDims, ServedAdapter, initial_weights
from sglang_mezo.core.objectives import copies_loss_fn
from sglang_mezo.core.params import TrainablePiece, TrainableSet
from sglang_mezo.core.probes import ProbeCopies, copies_needed, run_slot_step
from sglang_mezo.core.spsa import InconsistentWeightsError
from sglang_mezo.protocol import (
    AdapterVersion,
    ChunkOutcome,
    Failure,
    FailureKind,
    StepChunk,
    StepReport,
    weight_version_label,
)

from .faults import FaultInjector
from .lora_pool import loadable_refusal, make_resident, register, slot_tensors, unregister
from .serving import SchedulerServing

logger = logging.getLogger(__name__)


@dataclass
class TrainedAdapter:
    """One adapter a job trains: its fp32 master (PEFT names, on the model's device) and its probe adapters."""

    name: str
    job_id: str
    spec: LoraSpec
    master: TrainableSet
    probe_ids: list[str]
    _copies: dict[tuple[int, ...], ProbeCopies] = field(default_factory=dict, repr=False)

    def copies_at(self, pool, dims: ModelDims, slots: list[int]) -> ProbeCopies:
        """The probe copies as the given pool slots (views, made once per slot assignment)."""
        key = tuple(slots)
        if key not in self._copies:
            manifest = {p.name: p.full_shape for p in self.master.pieces}
            self._copies[key] = ProbeCopies(self.master, [slot_tensors(pool, dims, manifest, self.spec.rank, s)
                                                          for s in slots])
        return self._copies[key]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {p.name: p.data for p in self.master.pieces}


class AdapterTrainer:
    """Runs adapter chunks on the scheduler thread; every outcome is a reply, never an exception."""

    def __init__(self, serving: SchedulerServing, faults: Callable[[], FaultInjector] | None = None) -> None:
        self.serving = serving
        self._faults = faults
        self.adapters: dict[str, TrainedAdapter] = {}
        """By job id: the adapter each running adapter job trains."""

    def handle(self, chunk: StepChunk) -> ChunkOutcome:
        assert chunk.adapter is not None
        try:
            adapter = self._adapter_for(chunk)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            logger.warning("MeZO job %s: cannot train adapter %s: %s", chunk.job_id, chunk.adapter.name, exc)
            return ChunkOutcome(failure=Failure(FailureKind.INVALID, f"{type(exc).__name__}: {exc}"))
        manager = self.serving.lora_manager
        dims = ModelDims.of(self.serving.hf_config)
        engine = self.serving.engine
        needed = copies_needed(chunk.config)
        reports: list[StepReport] = []
        failure = None
        torn = False
        state = chunk.adaptive
        started = time.perf_counter()
        probes = adapter.probe_ids[:needed]
        if chunk.adapter.probes_in_one_batch:
            def score(items, js):
                return engine.score_copies(items, [probes[j] for j in js])
        else:
            def score(items, js):
                return [engine.score_copies(items, [probes[j]])[0] for j in js]
        self.serving.settle()  # an overlapped user forward may still read the slots we are about to write
        for step, batch in zip(chunk.steps, chunk.batches, strict=True):
            step_started = time.perf_counter()
            try:
                slots = make_resident(manager, probes)
                copies = adapter.copies_at(manager.memory_pool, dims, slots)
                losses = copies_loss_fn(score, chunk.objective, batch)
                if self._faults is not None:
                    losses = self._faults().wrap_copies(losses, chunk.config.seed, step, adapter.master)
                result = run_slot_step(copies, chunk.config, step, losses, state=state)
            except InconsistentWeightsError as exc:
                # the served versions are SGLang adapters of their own: the name keeps serving the last one
                logger.exception("MeZO job %s: adapter %s's master was left part-way", chunk.job_id, adapter.name)
                self.drop(chunk.job_id)
                torn = True
                failure = Failure(FailureKind.WEIGHTS_INCONSISTENT, f"{type(exc).__name__}: {exc}; the job's "
                                  f"training state is dropped and {adapter.name!r} keeps serving the version "
                                  "its last chunk published")
                break
            except Exception as exc:  # noqa: BLE001 - the master is untouched: the step simply did not happen
                logger.warning("MeZO job %s: step %d failed: %s", chunk.job_id, step, exc)
                failure = Failure(FailureKind.STEP_FAILED, f"{type(exc).__name__}: {exc}")
                break
            reports.append(StepReport(step, result, 1e3 * (time.perf_counter() - step_started)))
            state = result.adaptive
        version = None
        if reports and not torn:  # a master left part-way is never published
            try:
                version = self._publish(adapter, chunk.job_id, reports[-1].step + 1)
            except Exception as exc:  # noqa: BLE001 - the steps stand; the name keeps serving the last version
                logger.exception("MeZO job %s: registering adapter %s's new version failed", chunk.job_id,
                                 adapter.name)
                failure = failure or Failure(FailureKind.STEP_FAILED, f"registering the new version failed: {exc}")
        logger.info("MeZO job %s (adapter %s): %d step(s) in %.1f ms", chunk.job_id, adapter.name, len(reports),
                    1e3 * (time.perf_counter() - started))
        return ChunkOutcome(reports=tuple(reports), failure=failure, trainable_fingerprint=adapter.master.fingerprint(),
                            trainable_names=tuple(sorted(adapter.master.manifest)), adapter_version=version)

    def _adapter_for(self, chunk: StepChunk) -> TrainedAdapter:
        if chunk.job_id in self.adapters:
            return self.adapters[chunk.job_id]
        target = chunk.adapter
        manager = self.serving.lora_manager
        if manager is None:
            raise ValueError("this server has no LoRA pool: start it with --enable-lora")
        if self.serving.tp_size != 1:
            raise ValueError("adapter jobs train at tensor-parallel size 1 only (--tp-size 1)")
        refusal = loadable_refusal(target.spec)
        if refusal:
            raise ValueError(refusal)
        needed = copies_needed(chunk.config)
        vacancy = manager.max_loras_per_batch - manager.num_pinned_loras
        if needed > vacancy:
            raise ValueError(f"a step of this job scores {needed} probe adapters in one batch, but the LoRA pool has "
                             f"{vacancy} slots for them (--max-loras-per-batch {manager.max_loras_per_batch})")
        dims = ModelDims.of(self.serving.hf_config)
        device = self._device()
        pieces = [TrainablePiece(name, t.to(device), tuple(t.shape))
                  for name, t in initial_weights(dims, target.spec).items()]
        master = TrainableSet.from_pieces(pieces)
        dtype = self._dtype()
        probe_ids: list[str] = []
        try:
            for k in range(needed):
                probe_ids.append(f"mezo-probe-{chunk.job_id}-{k}-{uuid.uuid4().hex[:8]}")
                register(manager, lora_id=probe_ids[-1], name=probe_ids[-1], spec=target.spec,
                         tensors={p.name: p.data for p in pieces}, dtype=dtype)
        except Exception:
            for lora_id in probe_ids:
                unregister(manager, lora_id)
            raise
        adapter = TrainedAdapter(target.name, chunk.job_id, target.spec, master, probe_ids)
        self.adapters[chunk.job_id] = adapter
        logger.info("MeZO job %s: adapter %s (%s), from %s: %d tensors, %d parameters, %d probe slots",
                    chunk.job_id, target.name, target.spec.shape_text(),
                    "its seed" if target.spec.start is None else target.spec.start.describe(), len(pieces),
                    master.numel, needed)
        return adapter

    def _publish(self, adapter: TrainedAdapter, job_id: str, committed_steps: int) -> AdapterVersion:
        """Register the master as the adapter's next version under a fresh id."""
        # a version's id is its label (one per job and step count: unique, and the same when a restart rebuilds it)
        label = weight_version_label(job_id, committed_steps)
        self._register_version(adapter.name, label, adapter.spec, adapter.tensors())
        return AdapterVersion(adapter.name, label, committed_steps, label)

    def _register_version(self, name: str, lora_id: str, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
        # SGLang's manager refuses a second adapter of the same name: each version is registered there as name@id
        # (the HTTP side's registry maps the served name itself to the version's id)
        register(self.serving.lora_manager, lora_id=lora_id, name=f"{name}@{lora_id}", spec=spec, tensors=tensors,
                 dtype=self._dtype())

    def restore_at_launch(self, adapters: tuple[ServedAdapter, ...]) -> None:
        """Before serving: register each journaled adapter at the version its name served, rebuilt from its
        trajectory. One that cannot be rebuilt is logged and left out (requests by its name are refused)."""
        if not adapters:
            return
        dims = ModelDims.of(self.serving.hf_config)
        for adapter in adapters:
            try:
                self._register_version(adapter.name, adapter.lora_id, adapter.spec, adapter.tensors(dims))
                logger.info("MeZO: adapter %s served again at %s (%d steps replayed)", adapter.name, adapter.lora_id,
                            adapter.trajectory.committed_steps)
            except Exception:  # noqa: BLE001 - one adapter must not keep the server from starting
                logger.exception("MeZO: adapter %s could not be rebuilt from the journal", adapter.name)

    def retire(self, lora_ids: tuple[str, ...]) -> None:
        """Unload versions no request uses any more (the HTTP side waited for that)."""
        for lora_id in lora_ids:
            try:
                unregister(self.serving.lora_manager, lora_id)
            except Exception:  # noqa: BLE001 - a leftover CPU copy costs memory, never correctness
                logger.exception("MeZO: unloading adapter version %s failed", lora_id)

    def drop(self, job_id: str) -> None:
        """Forget a job's training state (its probe adapters); the versions it published stay until retired."""
        adapter = self.adapters.pop(job_id, None)
        if adapter is not None:
            self.retire(tuple(adapter.probe_ids))

    def _device(self) -> torch.device:
        return next(self.serving.engine.model.parameters()).device

    def _dtype(self) -> torch.dtype:
        return self.serving.lora_manager.dtype
