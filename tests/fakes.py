"""Fakes at our own interfaces, for the fast unit tests: the job runner's executor and scorer
(:class:`sglang_mezo.protocol.ChunkExecutor`, :class:`~sglang_mezo.protocol.ServedScorer`) over a tiny transformers
model in this process, and a tokenizer. The steps are real: the core's ``run_step`` on real weights, scored by the
reference engine, so trajectories, restores and failures can be checked bit for bit."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI
from tiny_models import tiny_llama

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.estimators import Adaptive, Estimator
from sglang_mezo.core.interface import CompletionScores, ScoringItem
from sglang_mezo.core.objectives import batch_loss_fn
from sglang_mezo.core.params import ParamSelection, TrainablePiece, TrainableSet, weights_digest
from sglang_mezo.core.probes import ProbeCopies, copies_needed, run_slot_step
from sglang_mezo.core.recipe import JobDefaults, Knobs
from sglang_mezo.core.run import run_step
from sglang_mezo.core.spsa import AbortedProbes, InconsistentWeightsError
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.engines.hf import HFEngine
from sglang_mezo.kernels import ZKind, zaxpy_
from sglang_mezo.options import Folders, Limits
from sglang_mezo.protocol import (
    ReplicaFingerprint,
    AbortedStep,
    AdapterVersion,
    ChunkOutcome,
    Failure,
    FailureKind,
    RestoreOutcome,
    SaveOutcome,
    StepChunk,
    StepReport,
    weight_version_label,
)


@dataclass
class Faults:
    """Scripted failures, each once: at (job id or "*" for any job, step), a scorer that raises on its second call
    (after the +εz and -εz passes) or a weight pass torn half-way; restores that fail, or leave the weights at no
    known state."""

    raise_at: set[tuple[str, int]] = field(default_factory=set)
    torn_at: set[tuple[str, int]] = field(default_factory=set)
    restore: FailureKind | None = None
    save: FailureKind | None = None

    @staticmethod
    def take(pending: set[tuple[str, int]], job_id: str, step: int) -> bool:
        for key in ((job_id, step), ("*", step)):
            if key in pending:
                pending.discard(key)
                return True
        return False


class FakeExecutor:
    """Holds the "served" weights: a tiny Llama's, moved in place by the core as the scheduler would."""

    def __init__(self, seed: int = 0) -> None:
        self.engine = HFEngine(tiny_llama(seed))
        self.base = {k: v.clone() for k, v in self.engine.model.state_dict().items()}
        self.version = "default"
        self.shards = 1
        """What :meth:`replicas` says: the shards the runner gives a job at its start."""
        self.faults = Faults()
        self.chunks: list[tuple[int, ...]] = []
        self.drains = 0
        self.gate: threading.Event | None = None
        """When set up, each chunk waits for it (a test holds a job mid-run; set from any thread)..."""
        self.hold_from = 0
        """... each chunk from this step on."""
        self.ended_adapter_jobs: list[str] = []
        self.adapter_masters: dict[str, TrainableSet] = {}

    def params(self, selection: ParamSelection) -> TrainableSet:
        return TrainableSet.from_pieces(self.engine.trainable_pieces(), selection, self.engine.num_layers)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.engine.model.state_dict().items()}

    async def run_chunk(self, chunk: StepChunk) -> ChunkOutcome:
        while self.gate is not None and not self.gate.is_set() and chunk.steps[0] >= self.hold_from:
            await asyncio.sleep(0.01)
        self.chunks.append(chunk.steps)
        if chunk.adapter is not None:
            return self._adapter_chunk(chunk)
        params = self.params(chunk.config.selection)
        reports: list[StepReport] = []
        for step, batch in zip(chunk.steps, chunk.batches, strict=True):
            abort: list[AbortedProbes] = []
            try:
                loss = self._loss(chunk, step, batch, params)
                state = reports[-1].result.adaptive if reports else chunk.adaptive
                reports.append(StepReport(step, run_step(params, chunk.config, step, loss, state=state,
                                                         on_abort=abort.append), 1.0))
            except InconsistentWeightsError as exc:
                return self._outcome(chunk, params, reports, None, Failure(FailureKind.WEIGHTS_INCONSISTENT,
                                                                            str(exc)), consistent=False)
            except Exception as exc:  # noqa: BLE001 - as the scheduler's handler: every failure is a reply
                aborted = AbortedStep(step, abort[0]) if abort else None
                return self._outcome(chunk, params, reports, aborted, Failure(FailureKind.STEP_FAILED, str(exc)))
        return self._outcome(chunk, params, reports, None, None)

    def _adapter_chunk(self, chunk: StepChunk) -> ChunkOutcome:
        """An adapter job's chunk, as the scheduler runs it (core.probes' real step), on a stand-in adapter: one
        fp32 tensor whose loss under each probe copy is ½‖w − 0.1‖²."""
        if chunk.job_id not in self.adapter_masters:
            self.adapter_masters[chunk.job_id] = TrainableSet.from_pieces(
                [TrainablePiece("lora.weight", torch.zeros(4, 8), (4, 8))])
        master = self.adapter_masters[chunk.job_id]
        copies = ProbeCopies(master, [[torch.zeros(4, 8)] for _ in range(copies_needed(chunk.config))])

        def losses(which):
            return [0.5 * float(((copies.copies[j][0].double() - 0.1) ** 2).sum()) for j in which]

        reports: list[StepReport] = []
        failure = None
        for step in chunk.steps:
            try:
                if self.faults.take(self.faults.raise_at, chunk.job_id, step):
                    raise RuntimeError("the scorer failed")
                state = reports[-1].result.adaptive if reports else chunk.adaptive
                reports.append(StepReport(step, run_slot_step(copies, chunk.config, step, losses, state=state), 1.0))
            except Exception as exc:  # noqa: BLE001 - as the scheduler's handler: every failure is a reply
                failure = Failure(FailureKind.STEP_FAILED, str(exc))
                break
        version = None
        if reports:
            label = weight_version_label(chunk.job_id, reports[-1].step + 1)
            version = AdapterVersion(chunk.adapter.name, label, reports[-1].step + 1, label)
        return ChunkOutcome(reports=tuple(reports), failure=failure, trainable_fingerprint=master.fingerprint(),
                            trainable_names=tuple(sorted(master.manifest)), adapter_version=version)

    def _loss(self, chunk: StepChunk, step: int, batch, params: TrainableSet):
        loss = batch_loss_fn(self.engine, chunk.objective, batch)
        if self.faults.take(self.faults.torn_at, chunk.job_id, step):
            zaxpy_(params.targets[: len(params.targets) // 2], [7], [1e-2], kind=chunk.config.z_kind)
            raise InconsistentWeightsError("torn")
        if not self.faults.take(self.faults.raise_at, chunk.job_id, step):
            return loss
        calls = []

        def failing() -> float:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("the scorer failed")
            return loss()

        return failing

    def _outcome(self, chunk, params, reports, aborted, failure, *, consistent: bool = True) -> ChunkOutcome:
        version = chunk.weight_version_after(reports, aborted) if consistent else None
        self.version = version or self.version
        return ChunkOutcome(reports=tuple(reports), aborted=aborted, failure=failure, weights_consistent=consistent,
                            trainable_fingerprint=params.fingerprint(),
                            trainable_names=tuple(sorted(params.manifest)), weight_version=version)

    async def drain(self, timeout_s: float) -> None:
        self.drains += 1

    async def restore(self, history: Sequence[Trajectory], weight_version: str) -> RestoreOutcome:
        if self.faults.restore is not None:
            kind, self.faults.restore = self.faults.restore, None
            return RestoreOutcome(failure=Failure(kind, "the restore failed"),
                                  weights_consistent=kind is not FailureKind.WEIGHTS_INCONSISTENT)
        self.engine.model.load_state_dict(self.base)
        steps = sum(t.replay(self.params(MezoConfig.from_dict(t.config).selection)) for t in history)
        self.version = weight_version
        return RestoreOutcome(message=f"replayed {steps} step(s)", weight_version=weight_version)

    async def end_adapter_job(self, job_id: str) -> None:
        self.ended_adapter_jobs.append(job_id)

    async def replicas(self) -> int:
        return self.shards

    async def fingerprints(self) -> tuple[ReplicaFingerprint, ...]:
        pieces = self.engine.trainable_pieces()
        return (ReplicaFingerprint(dp_rank=0, tp_rank=0, digest=weights_digest(pieces),
                                   tensors=len({p.name for p in pieces}), weight_version=self.version),)

    async def save(self, path: str, *, float32: bool = False) -> SaveOutcome:
        if self.faults.save is not None:
            kind, self.faults.save = self.faults.save, None
            return SaveOutcome(failure=Failure(kind, "the save failed"))
        self.engine.model.save_pretrained(path)
        return SaveOutcome(weight_version=self.version, tensors=tuple(sorted(self.base)), message="saved")


class FakeScorer:
    """Scores with the executor's engine, as served now."""

    def __init__(self, executor: FakeExecutor) -> None:
        self.executor = executor

    async def score(self, items: Sequence[ScoringItem]) -> tuple[CompletionScores, set[str]]:
        return self.executor.engine.score(items), {self.executor.version}

    def under(self, adapter: str) -> FakeScorer:
        return self

    async def generate(self, items: Sequence[ScoringItem]) -> list[tuple[str, str]]:
        # the "generation" is the completion's first token repeated: half right, as text of token ids
        return [(" ".join(str(i.completion_ids[0]) for _ in i.completion_ids),
                 " ".join(map(str, i.completion_ids))) for i in items]


class CharTokenizer:
    """A tokenizer with the call signature of transformers' (one id per character, below the tiny vocabulary;
    id 1 starts a prompt)."""

    def __init__(self, vocab: int = 64) -> None:
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [4 + ord(c) % (self.vocab - 4) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def replayed(executor: FakeExecutor, history: Sequence[Trajectory]) -> dict[str, torch.Tensor]:
    """The base weights with ``history`` replayed, computed apart from the executor's own weights."""
    copy = FakeExecutor()
    copy.engine.model.load_state_dict(executor.base)
    for trajectory in history:
        trajectory.replay(copy.params(MezoConfig.from_dict(trajectory.config).selection))
    return copy.weights()


FAKE_MODEL_NAME = "fake-model"
"""What the fake app's ``/v1/models`` calls its base model."""


def mezo_app(root: Path, *, limits: Limits = Limits(max_steps_per_job=50), context_len: int = 64,
             folders: Folders | None = None, **runner_options) -> tuple[FastAPI, FakeExecutor]:
    """The /mezo API on a plain FastAPI app over the fakes: data files are read from ``root/data``, checkpoints
    written to ``root/out`` (or as ``folders`` say), and ``root/base`` stands for the base checkpoint."""
    from sglang_mezo.jobs.runner import JobRunner
    from sglang_mezo.server.app import install
    from sglang_mezo.server.context import MezoContext
    from sglang_mezo.server.files import FileAccess
    from sglang_mezo.server.fine_tuning.files import FileStore
    from sglang_mezo.server.fine_tuning.service import FineTuning
    from sglang_mezo.server.fine_tuning.translate import FileTranslator
    from sglang_mezo.server.translate import Translator

    for folder in ("data", "out", "base"):
        (root / folder).mkdir(exist_ok=True)
    executor = FakeExecutor()
    runner = JobRunner(executor, FakeScorer(executor), **{"yield_s": 0.0, "max_active": limits.max_queued_jobs,
                                                          **runner_options})
    app = FastAPI()
    folders = folders or Folders(data_dirs=(str(root / "data"),), output_dir=str(root / "out"))
    files = FileAccess.of(folders, str(root / "base"))
    translator = Translator(CharTokenizer(), context_len)
    # every knob set, as flags would: these tests are about the routes, not the recipe (tests/test_recipe.py)
    defaults = JobDefaults(base=MezoConfig(z_kind=ZKind.RADEMACHER),
                           flags=Knobs(lr=1e-2, eps=1e-3, n_probes=1, estimator=Estimator.SPSA, adaptive=Adaptive.NONE,
                                       selection=ParamSelection()))
    uploads = FileStore(root / "uploads", limits.max_stored_files)
    service = FineTuning(runner, uploads, FileTranslator(translator), defaults, limits, FAKE_MODEL_NAME)
    install(app, MezoContext(runner=runner, translator=translator, defaults=defaults, limits=limits, files=files,
                             base_model=str(root / "base"), openai_files=uploads, fine_tuning=service))
    return app, executor


@contextlib.contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """``app`` on a real HTTP port (uvicorn, in a thread, one event loop for every request); yields its URL."""
    import uvicorn
    from servers import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
