"""The step handler of SGLang's scheduler (``sglang_mezo.scheduler.handler``) without SGLang running: its view of the
scheduler (``SchedulerServing``) is replaced by one over a tiny transformers model saved as a real checkpoint, so
chunks, failures (injected exactly as the server tests inject them), the inconsistency latch, restores and saves
run their real code, and the weights are compared bit for bit with replays of what the handler reported. Data
parallelism runs two handlers, one per replica, on two threads with a group of our own between them (the
replicas' gloo group is the one thing replaced)."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny_models import memorisation_task, tiny_llama
from transformers import AutoModelForCausalLM

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import Objective
from sglang_mezo.core.params import ParamSelection, TrainableSet
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.engines.hf import HFEngine
from sglang_mezo.kernels import ZKind
from sglang_mezo.protocol import ChunkOutcome, FailureKind, StepChunk
from sglang_mezo.scheduler.agreement import Agreement
from sglang_mezo.scheduler.faults import FaultInjector
from sglang_mezo.scheduler.handler import MezoSchedulerHandler
from sglang_mezo.scheduler.messages import (
    MezoChunkReqInput,
    MezoFingerprintReqInput,
    MezoRestoreReqInput,
    MezoSaveReqInput,
)
from sglang_mezo.scheduler.replicas import Place
from sglang_mezo.server.sglang_adapters import agreed

BATCH = tuple(memorisation_task(n=3, seed=4))
CONFIG = MezoConfig(lr=1e-2, eps=1e-3, n_probes=2, z_kind=ZKind.GAUSSIAN, total_steps=20, seed=1)


class ThreadGroup:
    """The replicas' group for handlers on threads of one process: each collective waits for every member."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size

    def _exchange(self, rank: int, value) -> list:
        self.slots[rank] = value
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read them
        return everyone

    def member(self, rank: int) -> ThreadMember:
        return ThreadMember(self, rank)


@dataclasses.dataclass
class ThreadMember:
    group: ThreadGroup
    rank: int

    def all_reduce_min(self, flags: torch.Tensor) -> None:
        flags.copy_(torch.stack(self.group._exchange(self.rank, flags.clone())).min(0).values)

    def all_gather(self, values: list[float]) -> list[list[float]]:
        return [list(row) for row in self.group._exchange(self.rank, list(values))]


class FakeServing:
    """SGLang's scheduler as the handler sees it, over a transformers model (one TP rank; replica ``place.dp_rank``
    of ``place.dp_size``, whose group is ``replicas``)."""

    tp_rank, tp_size = 0, 1

    def __init__(self, model_path: str, place: Place = Place(0, 1, 0, 1), replicas: ThreadMember | None = None) -> None:
        self.place = place
        self.replicas = replicas
        self.model_path = model_path
        self.engine = HFEngine(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))
        self.events: list[str] = []
        self.paused_by_others = False
        self.flush_ok = True
        self.version = "default"

    def is_paused(self) -> bool:
        return self.paused_by_others

    def pause(self) -> None:
        self.events.append("pause")

    def resume(self) -> None:
        self.events.append("resume")

    def fence(self) -> None:
        self.events.append("fence")

    def flush_cache(self) -> bool:
        self.events.append("flush")
        return self.flush_ok

    def label(self, version: str) -> None:
        self.version = version

    def weight_version(self) -> str:
        return self.version

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.engine.model.state_dict().items()}

    def agreement(self) -> Agreement:
        return Agreement(self.place.size, None if self.replicas is None else self.replicas.all_reduce_min)


@pytest.fixture
def model_path(tmp_path) -> str:
    tiny_llama(seed=6).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def handler_for(model_path: str, faults: str = "") -> tuple[MezoSchedulerHandler, FakeServing]:
    serving = FakeServing(model_path)
    return MezoSchedulerHandler(serving, faults=FaultInjector(faults, rank=0)), serving


def run(handler: MezoSchedulerHandler, job_id: str, steps: range, config: MezoConfig = CONFIG) -> ChunkOutcome:
    chunk = StepChunk(job_id, config, Objective.CROSS_ENTROPY, tuple(steps), (BATCH,) * len(steps))
    return handler.handle(MezoChunkReqInput(chunk=chunk)).outcome


def trajectory_of(outcomes: list[ChunkOutcome], config: MezoConfig = CONFIG) -> Trajectory:
    """The trajectory the job runner would build from these replies."""
    first = outcomes[0]
    trajectory = Trajectory(z_kind=config.z_kind, trainable_fingerprint=first.trainable_fingerprint,
                            trainable_names=list(first.trainable_names), config=config.to_dict())
    for outcome in outcomes:
        for report in outcome.reports:
            trajectory.append(report.step, report.result)
        if outcome.aborted is not None:
            trajectory.append_aborted(outcome.aborted.step, outcome.aborted.probes)
    return trajectory


def replayed(model_path: str, *trajectories: Trajectory) -> dict[str, torch.Tensor]:
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))
    for trajectory in trajectories:
        trajectory.replay(TrainableSet.from_pieces(engine.trainable_pieces(),
                                                   MezoConfig.from_dict(trajectory.config).selection))
    return engine.model.state_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_chunk_runs_its_steps_between_a_pause_and_a_flush(model_path):
    handler, serving = handler_for(model_path)
    first, second = run(handler, "job", range(0, 3)), run(handler, "job", range(3, 5))
    assert first.failure is None and second.failure is None
    assert [r.step for r in first.reports + second.reports] == [0, 1, 2, 3, 4]
    assert second.weight_version == serving.version == "mezo-job-5"
    # the device fence (user forwards wait for the last pass) comes before anything is served again
    assert serving.events == ["pause", "fence", "flush", "resume"] * 2
    assert_same(serving.weights(), replayed(model_path, trajectory_of([first, second])))
    # someone else paused serving: the handler leaves it paused
    serving.paused_by_others, serving.events = True, []
    run(handler, "job", range(5, 6))
    assert serving.events == ["pause", "fence", "flush"]


def test_no_served_tensor_is_ever_reallocated(model_path):
    """CUDA graphs replay on the weights' addresses: steps, a failed step, a restore (a re-read of the checkpoint)
    and a save move values, never storage."""
    handler, serving = handler_for(model_path, "raise@1/1:1")
    addresses = {name: t.data_ptr() for name, t in serving.engine.model.state_dict().items()}
    before = serving.weights()
    outcome = run(handler, "job", range(0, 3))
    assert outcome.failure is not None and not torch.equal(serving.weights()["model.norm.weight"],
                                                           before["model.norm.weight"])
    handler.restore(MezoRestoreReqInput(history=(), weight_version="base"))
    assert_same(serving.weights(), before)
    assert {name: t.data_ptr() for name, t in serving.engine.model.state_dict().items()} == addresses


# two probes: loss call 3 follows the third pass (+εz₂); a NaN there is seen once its -εz₂ partner is scored too
@pytest.mark.parametrize("kind, failure, passes", [("raise", "RuntimeError: injected", 3),
                                                   ("nan", "NonFiniteLossError", 4)])
def test_a_failed_step_is_taken_off_and_its_probe_passes_reported(model_path, kind, failure, passes):
    handler, serving = handler_for(model_path, f"{kind}@1/2:3")  # job seed 1, step 2, before loss call 3
    outcome = run(handler, "job", range(0, 4))
    assert outcome.failure.kind is FailureKind.STEP_FAILED and failure in outcome.failure.message
    assert [r.step for r in outcome.reports] == [0, 1] and outcome.weights_consistent
    assert outcome.aborted.step == 2 and outcome.aborted.probes.passes == passes
    assert serving.version == "mezo-job-2-aborted"
    assert_same(serving.weights(), replayed(model_path, trajectory_of([outcome])))
    assert run(handler, "job", range(2, 3)).failure is None  # training goes on


def test_a_torn_pass_latches_training_off_until_a_restore(model_path, tmp_path):
    handler, serving = handler_for(model_path, "torn@1/1:2")
    good = run(handler, "job", range(0, 1))
    torn = run(handler, "job", range(1, 3))
    assert torn.failure.kind is FailureKind.WEIGHTS_INCONSISTENT and not torn.weights_consistent
    assert torn.aborted is None and torn.reports == () and torn.weight_version is None
    refused = run(handler, "job", range(1, 2))
    assert refused.failure.kind is FailureKind.TRAINING_DISABLED and refused.reports == ()
    saved = handler.save(MezoSaveReqInput(path=str(tmp_path / "out"))).outcome
    assert saved.failure.kind is FailureKind.TRAINING_DISABLED

    history = trajectory_of([good])
    restored = handler.restore(MezoRestoreReqInput(history=(history,), weight_version="mezo-job-1")).outcome
    assert restored.failure is None and restored.weight_version == serving.version == "mezo-job-1"
    assert_same(serving.weights(), replayed(model_path, history))
    assert run(handler, "job", range(1, 2)).failure is None


def test_restores_that_cannot_run_leave_the_weights_alone(model_path, tmp_path):
    handler, serving = handler_for(model_path)
    outcome = run(handler, "job", range(0, 2))
    before = serving.weights()
    other = Trajectory(z_kind=ZKind.GAUSSIAN, trainable_fingerprint="0" * 16, trainable_names=["x"],
                       config=CONFIG.to_dict())
    bad = handler.restore(MezoRestoreReqInput(history=(other,), weight_version="v")).outcome
    assert bad.failure.kind is FailureKind.INVALID and "trainable tensors differ" in bad.failure.message
    serving.model_path = str(tmp_path / "gone")
    gone = handler.restore(MezoRestoreReqInput(history=(trajectory_of([outcome]),), weight_version="v")).outcome
    assert gone.failure.kind is FailureKind.CHECKPOINT and "not a local checkpoint folder" in gone.failure.message
    assert_same(serving.weights(), before)
    assert handler.inconsistent is False


def test_a_bad_chunk_and_a_cache_that_cannot_be_flushed(model_path):
    handler, serving = handler_for(model_path)
    nothing = MezoConfig(selection=ParamSelection(include=("no such tensor",)))
    bad = run(handler, "job", range(0, 1), nothing)
    assert bad.failure.kind is FailureKind.INVALID and "matches no trainable tensor" in bad.failure.message
    assert serving.events == []  # refused before serving was paused
    serving.flush_ok = False
    run(handler, "job", range(0, 1))  # the prefix cache may now hold KV of older weights: stop training
    assert run(handler, "job", range(1, 2)).failure.kind is FailureKind.TRAINING_DISABLED


def test_save_writes_the_served_weights_as_a_checkpoint(model_path, tmp_path):
    handler, serving = handler_for(model_path)
    run(handler, "job", range(0, 2), MezoConfig(lr=1e-2, n_probes=1, total_steps=2,
                                                selection=ParamSelection(last_layers=1)))
    saved = handler.save(MezoSaveReqInput(path=str(tmp_path / "out"))).outcome
    assert saved.failure is None and saved.weight_version == "mezo-job-2"
    assert "model.layers.1.mlp.up_proj.weight" in saved.tensors
    assert not any(".layers.0." in name for name in saved.tensors)
    assert_same(AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict(),
                serving.weights())
    assert not (tmp_path / "out" / ".mezo-parts").exists()


# -- data parallel: two replicas, one group ----------------------------------------------------------------------------

SHARDED = dataclasses.replace(CONFIG, shards=2)


def replicas(model_path: str, faults: str = "") -> list[tuple[MezoSchedulerHandler, FakeServing]]:
    group = ThreadGroup(2)
    out = []
    for rank in range(2):
        serving = FakeServing(model_path, Place(rank, 2, 0, 1), group.member(rank))
        out.append((MezoSchedulerHandler(serving, faults=FaultInjector(faults, rank=rank)), serving))
    return out


def on_both(pairs, call) -> list:
    with ThreadPoolExecutor(len(pairs)) as pool:
        return list(pool.map(lambda pair: call(pair[0]), pairs))


def test_replicas_share_each_batch_and_end_with_the_same_weights_as_a_replay(model_path):
    pairs = replicas(model_path)
    outcomes = on_both(pairs, lambda h: run(h, "job", range(0, 3), SHARDED))
    assert all(o.failure is None and len(o.reports) == 3 for o in outcomes), outcomes
    # the same combined losses, coefficients and label on both: the HTTP side's check passes
    assert [r.result for r in outcomes[0].reports] == [r.result for r in outcomes[1].reports]
    assert agreed(outcomes).weights_consistent
    (_, first), (_, second) = pairs
    assert_same(first.weights(), second.weights())
    assert_same(first.weights(), replayed(model_path, trajectory_of(outcomes[:1], SHARDED)))
    digests = on_both(pairs, lambda h: h.fingerprint(MezoFingerprintReqInput()).outcome)
    assert digests[0].digest == digests[1].digest and [d.dp_rank for d in digests] == [0, 1]
    # the combined loss is the whole batch's: one process scoring all of it (its probes come off the same way)
    whole, _ = handler_for(model_path)
    alone = run(whole, "job", range(0, 1), dataclasses.replace(SHARDED, shards=1))
    assert outcomes[0].reports[0].result.loss_plus == pytest.approx(alone.reports[0].result.loss_plus, rel=1e-6)  # fp32 losses


def test_a_failure_on_one_replica_aborts_the_step_on_both_at_the_same_pass(model_path):
    pairs = replicas(model_path, "raise@1/1:3#1")  # job seed 1, step 1, loss call 3, replica 1 only
    outcomes = on_both(pairs, lambda h: run(h, "job", range(0, 3), SHARDED))
    assert [len(o.reports) for o in outcomes] == [1, 1]
    assert outcomes[0].aborted == outcomes[1].aborted and outcomes[0].aborted.probes.passes == 3
    assert "another replica" in outcomes[0].failure.message and outcomes[0].failure.elsewhere
    assert "injected" in outcomes[1].failure.message and not outcomes[1].failure.elsewhere
    assert "injected" in agreed(outcomes).failure.message  # the HTTP side reports the replica that failed
    (_, first), (_, second) = pairs
    assert_same(first.weights(), second.weights())
    assert_same(first.weights(), replayed(model_path, trajectory_of(outcomes[:1], SHARDED)))
    # the next chunk carries on from the committed step on both
    again = on_both(pairs, lambda h: run(h, "job", range(1, 3), SHARDED))
    assert all(o.failure is None for o in again)
    assert_same(first.weights(), second.weights())


def test_a_job_made_for_another_number_of_replicas_is_refused(model_path):
    handler, serving = handler_for(model_path)
    before = serving.weights()
    outcome = run(handler, "job", range(0, 1), SHARDED)
    assert outcome.failure.kind is FailureKind.INVALID and "2 replica(s)" in outcome.failure.message
    assert_same(serving.weights(), before)


def test_replies_that_disagree_keep_no_step_and_ask_for_a_restore(model_path):
    pairs = replicas(model_path)
    outcomes = on_both(pairs, lambda h: run(h, "job", range(0, 1), SHARDED))
    tampered = dataclasses.replace(outcomes[1], weight_version="mezo-other-1")
    merged = agreed([outcomes[0], tampered])
    assert merged.reports == () and not merged.weights_consistent
    assert merged.failure.kind is FailureKind.WEIGHTS_INCONSISTENT


def test_only_replica_zero_writes_a_save(model_path, tmp_path):
    pairs = replicas(model_path)
    on_both(pairs, lambda h: run(h, "job", range(0, 1), SHARDED))
    saved = on_both(pairs, lambda h: h.save(MezoSaveReqInput(path=str(tmp_path / "out"))).outcome)
    assert saved[0].failure is None and saved[0].tensors and saved[1].tensors == ()
    assert agreed(saved) is saved[0]
    assert_same(AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict(),
                pairs[1][1].weights())
