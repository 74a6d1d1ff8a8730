"""The job runner (``sglang_mezo.jobs.runner``) with a fake executor that runs the core's real steps on a tiny
model in this process: chunking and yielding, evaluations, the FIFO queue, cancellation, failures and recovery,
resets and saves. The served weights are checked bit for bit against replays of the trajectories."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from fakes import FakeExecutor, FakeScorer, replayed
from tiny_models import memorisation_task

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.lora import LoraSpec
from sglang_mezo.core.objectives import Objective
from sglang_mezo.jobs.errors import Conflict, InvalidRequest, NotFound, TooMany, Unavailable
from sglang_mezo.jobs.job import JobStatus
from sglang_mezo.jobs.runner import JobRunner
from sglang_mezo.jobs.spec import JobSpec
from sglang_mezo.kernels import ZKind
from sglang_mezo.protocol import AdapterTarget, FailureKind

EXAMPLES = tuple(memorisation_task(n=6, seed=1))
HELD_OUT = tuple(memorisation_task(n=3, seed=2))


def spec(steps: int, seed: int = 0, **overrides) -> JobSpec:
    config = MezoConfig(lr=1e-2, eps=1e-3, z_kind=ZKind.RADEMACHER, total_steps=steps, seed=seed)
    return JobSpec(**{"examples": EXAMPLES, "objective": Objective.CROSS_ENTROPY, "config": config, "batch_size": 4,
                      **overrides})


def make_runner(**kwargs) -> tuple[JobRunner, FakeExecutor]:
    executor = FakeExecutor()
    return JobRunner(executor, FakeScorer(executor), yield_s=1.0, **kwargs), executor


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        assert torch.equal(a[name], b[name]), name


def served_history(runner: JobRunner):
    return [s.trajectory for s in runner.weights.segments]


def test_a_job_runs_in_chunks_and_its_trajectory_is_the_served_weights():
    async def main():
        runner, executor = make_runner(chunk_target_s=60.0, max_chunk_steps=4)
        job = runner.submit(spec(10, eval_examples=HELD_OUT, eval_every=3))
        await job.done.wait()
        return runner, executor, job

    runner, executor, job = asyncio.run(main())
    assert job.status is JobStatus.SUCCEEDED and job.steps_done == 10 and job.failure is None
    # one step first (to time it), then up to 4 per chunk, ending where an evaluation is due
    assert executor.chunks == [(0,), (1, 2), (3, 4, 5), (6, 7, 8), (9,)]
    assert executor.drains == 4  # between chunks, not after the last
    assert [e.step for e in job.evals] == [0, 3, 6, 9, 10]
    assert job.evals[0].weight_version == "default" and job.evals[-1].weight_version == f"mezo-{job.id}-10"
    assert [r.step for r in job.reports] == list(range(10)) and job.trajectory.committed_steps == 10
    assert runner.weights.weight_version == f"mezo-{job.id}-10"
    assert_same(executor.weights(), replayed(executor, served_history(runner)))


def test_jobs_queue_in_order_and_each_starts_on_the_weights_the_last_left():
    async def main():
        runner, executor = make_runner()
        first, second = runner.submit(spec(3, seed=1)), runner.submit(spec(2, seed=2))
        assert second.status is JobStatus.QUEUED
        await second.done.wait()
        return runner, executor, first, second

    runner, executor, first, second = asyncio.run(main())
    assert first.finished <= second.started
    assert [s.job_id for s in second.served_before] == [first.id]
    assert [(s.job_id, s.steps) for s in runner.weights.segments] == [(first.id, 3), (second.id, 2)]
    assert_same(executor.weights(), replayed(executor, served_history(runner)))


def test_cancel_a_queued_job_at_once_and_a_running_one_at_a_chunk_boundary():
    async def main():
        runner, executor = make_runner(chunk_target_s=0.0)
        executor.gate = threading.Event()
        running, queued = runner.submit(spec(50, seed=1)), runner.submit(spec(5, seed=2))
        await asyncio.sleep(0.05)  # the first job waits at its first chunk
        assert runner.cancel(queued.id).status is JobStatus.CANCELLED and queued.done.is_set()
        runner.cancel(running.id)
        assert running.status is JobStatus.RUNNING  # until its chunk ends
        executor.gate.set()
        await running.done.wait()
        return runner, executor, running, queued

    runner, executor, running, queued = asyncio.run(main())
    assert running.status is JobStatus.CANCELLED and running.steps_done == 1
    assert queued.steps_done == 0 and queued.id not in {s.job_id for s in runner.weights.segments}
    assert_same(executor.weights(), replayed(executor, served_history(runner)))
    with pytest.raises(NotFound):
        runner.cancel("nope")


def test_a_failed_step_ends_the_job_and_its_probe_passes_stay_in_the_trajectory():
    async def main():
        runner, executor = make_runner()
        job = runner.submit(spec(6, seed=3))
        executor.faults.raise_at.add((job.id, 4))
        await job.done.wait()
        return runner, executor, job

    runner, executor, job = asyncio.run(main())
    assert job.status is JobStatus.FAILED and job.steps_done == 4
    assert job.failure.kind is FailureKind.STEP_FAILED and "scorer failed" in job.failure.message
    assert [r.aborted_passes for r in job.trajectory] == [0, 0, 0, 0, 2]  # +εz, then -εz, then the failure
    assert runner.weights.weight_version == f"mezo-{job.id}-4-aborted"
    # the round trip of the aborted probe is part of the weights: exact replay reproduces them bit for bit
    assert_same(executor.weights(), replayed(executor, served_history(runner)))


def test_a_torn_weight_pass_is_restored_at_once_and_training_goes_on():
    async def main():
        runner, executor = make_runner()
        first = runner.submit(spec(3, seed=4))
        torn = runner.submit(spec(6, seed=5))
        executor.faults.torn_at.add((torn.id, 2))
        await torn.done.wait()
        weights = executor.weights()
        after = runner.submit(spec(2, seed=6))
        await after.done.wait()
        return runner, executor, first, torn, weights, after

    runner, executor, first, torn, weights, after = asyncio.run(main())
    assert torn.status is JobStatus.FAILED and torn.steps_done == 2 and not torn.weights_lost
    assert torn.failure.kind is FailureKind.WEIGHTS_INCONSISTENT
    assert "restored to the last committed step" in torn.failure.message
    history = [s.trajectory for s in after.served_before]
    assert [s.job_id for s in after.served_before] == [first.id, torn.id]
    assert_same(weights, replayed(executor, history))  # the torn half moved 1e-2: it would show
    assert after.status is JobStatus.SUCCEEDED


def test_a_restore_that_fails_leaves_training_off_until_a_reset_succeeds():
    async def main():
        runner, executor = make_runner()
        job = runner.submit(spec(4, seed=7))
        executor.faults.torn_at.add((job.id, 1))
        executor.faults.restore = FailureKind.WEIGHTS_INCONSISTENT
        await job.done.wait()
        assert job.weights_lost and runner.weights.lost
        assert "training stays disabled" in job.failure.message
        with pytest.raises(Conflict):
            runner.submit(spec(1))
        with pytest.raises(Conflict):
            await runner.evaluate(Objective.CROSS_ENTROPY, HELD_OUT)
        with pytest.raises(Conflict):
            await runner.weights.save("/nonexistent")
        await runner.reset()
        return runner, executor

    runner, executor = asyncio.run(main())
    assert not runner.weights.lost and runner.weights.segments == []
    assert_same(executor.weights(), executor.base)


def test_reset_to_the_base_to_a_step_of_any_job_and_its_refusals():
    async def main():
        runner, executor = make_runner()
        first = runner.submit(spec(4, seed=8))
        second = runner.submit(spec(3, seed=9))
        await second.done.wait()
        at_end = executor.weights()
        await runner.reset(first.id, 2)
        checks = {"first@2": (executor.weights(), replayed(executor, [first.trajectory.upto(2)]))}
        assert [(s.job_id, s.steps) for s in runner.weights.segments] == [(first.id, 2)]
        assert runner.weights.weight_version == f"mezo-{first.id}-2"
        await runner.reset(second.id)  # "forward" again to a job the last reset dropped
        checks["second"] = (executor.weights(), at_end)
        for job_id, step, error in [("nope", None, NotFound), (first.id, 9, InvalidRequest),
                                    (None, 1, InvalidRequest)]:
            with pytest.raises(error):
                await runner.reset(job_id, step)
        executor.gate = threading.Event()
        busy = runner.submit(spec(2, seed=10))
        with pytest.raises(Conflict, match="queued or running"):
            await runner.reset()
        runner.cancel(busy.id)
        executor.gate.set()
        await busy.done.wait()
        executor.faults.restore = FailureKind.CHECKPOINT
        with pytest.raises(Unavailable, match="restore failed"):
            await runner.reset()
        await runner.reset()
        checks["base"] = (executor.weights(), executor.base)
        return checks

    for served, expected in asyncio.run(main()).values():
        assert_same(served, expected)


def test_save_writes_the_history_that_leads_to_the_saved_weights(tmp_path):
    async def main():
        runner, executor = make_runner()
        job = runner.submit(spec(3, seed=11))
        await job.done.wait()
        return await runner.weights.save(str(tmp_path)), job

    report, job = asyncio.run(main())
    assert report.weight_version == f"mezo-{job.id}-3" and report.tensors
    provenance = json.loads((tmp_path / "mezo_history.json").read_text())
    assert provenance["weight_version"] == report.weight_version
    assert [h["steps"]["step"] for h in provenance["history"]] == [[0, 1, 2]]


def test_statistics_best_evaluation_and_observers():
    class Recorder:
        def __init__(self) -> None:
            self.started, self.steps, self.evals, self.finished = [], 0, 0, []

        def on_start(self, job) -> None:
            self.started.append((job.status, self.steps, self.evals))

        def on_steps(self, job, reports) -> None:
            self.steps += len(reports)

        def on_eval(self, job, evaluation) -> None:
            self.evals += 1

        def on_finish(self, job) -> None:
            self.finished.append(job.status)

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("an observer that always fails")

    recorder = Recorder()

    async def main():
        runner, _ = make_runner(observers=[Broken(), recorder])
        job = runner.submit(spec(5, seed=12, eval_examples=HELD_OUT, eval_every=2))
        await job.done.wait()
        return job

    job = asyncio.run(main())
    assert job.status is JobStatus.SUCCEEDED  # a failing observer does not stop training
    assert (recorder.steps, recorder.evals, recorder.finished) == (5, 4, [JobStatus.SUCCEEDED])
    assert recorder.started == [(JobStatus.RUNNING, 0, 0)]  # told once, running, before its first evaluation
    stats = job.grad_stats()
    grads = sorted(abs(r.result.projected_grads[0]) for r in job.reports)
    assert stats.abs_grad_quantiles.min == grads[0] and stats.abs_grad_quantiles.max == grads[-1]
    assert stats.zero_grad_rate == sum(g == 0 for g in grads) / 5
    assert job.best_eval == min(job.evals, key=lambda e: (e.metrics.loss, e.step))  # no accuracy: lowest loss
    assert job.longest_step_ms == max(r.step_ms for r in job.reports)


def test_a_dpo_job_measures_its_references_on_the_weights_it_starts_from():
    """The pairs' π_ref is scored once, before the first step, on the weights served when the job starts (after an
    earlier job's steps): the first evaluation's margins are all 0, so its loss is log 2 exactly, and training
    moves the margins towards the chosen answers."""
    import math

    from sglang_mezo.core.objectives import PreferenceExample, scoring_items

    pairs = tuple(PreferenceExample(e.prompt_ids, e.completion_ids, tuple(reversed(e.completion_ids)), beta=1.0)
                  for e in EXAMPLES if len(set(e.completion_ids)) > 1)
    assert len(pairs) >= 3

    async def main():
        runner, executor = make_runner(chunk_target_s=60.0)
        await runner.submit(spec(3)).done.wait()  # the served weights are no longer the base
        before = executor.engine.score(scoring_items(pairs)).sum_logprob.tolist()
        job = runner.submit(spec(40, objective=Objective.DPO, examples=pairs, eval_examples=pairs,
                                 config=MezoConfig(lr=5e-2, eps=1e-3, z_kind=ZKind.RADEMACHER, total_steps=40)))
        await job.done.wait()
        return job, before

    job, before = asyncio.run(main())
    assert job.status is JobStatus.SUCCEEDED, job.failure
    assert [p.reference for p in job.spec.examples] == [tuple(before[2 * i : 2 * i + 2]) for i in range(len(pairs))]
    assert job.evals[0].metrics.loss == pytest.approx(math.log(2), abs=1e-12)
    assert job.evals[-1].metrics.loss < job.evals[0].metrics.loss



def adapter_spec(steps: int, name: str, seed: int = 0) -> JobSpec:
    return spec(steps, seed, adapter=AdapterTarget(name, LoraSpec(rank=4, alpha=8, target_modules=("q_proj",
                                                                                                    "v_proj"))))


def test_adapter_jobs_train_at_once_beside_the_queue_within_their_limit():
    async def main():
        runner, executor = make_runner(max_adapter_jobs=2, chunk_target_s=0.0)
        executor.gate = threading.Event()
        a, b = runner.submit(adapter_spec(5, "a")), runner.submit(adapter_spec(5, "b", seed=1))
        await asyncio.sleep(0.05)
        both_running = (a.status, b.status)
        refusals = []
        for attempt in (lambda: runner.submit(adapter_spec(2, "a")), lambda: runner.submit(adapter_spec(2, "c")),
                        lambda: runner.submit(spec(2))):
            try:
                attempt()
            except (Conflict, TooMany) as exc:
                refusals.append(type(exc).__name__)
        executor.gate.set()
        await asyncio.gather(a.done.wait(), b.done.wait())
        await asyncio.sleep(0.01)  # the jobs' tasks end their scheduler state after done is set
        base = runner.submit(spec(2))
        await base.done.wait()
        return runner, executor, a, b, both_running, refusals, base

    runner, executor, a, b, both_running, refusals, base = asyncio.run(main())
    assert both_running == (JobStatus.RUNNING, JobStatus.RUNNING)
    assert refusals == ["Conflict", "TooMany", "Conflict"]  # busy name, past the limit, a base job under them
    for job in (a, b):
        assert job.status is JobStatus.SUCCEEDED and job.adapter_version.committed_steps == 5
        assert job.trajectory.adapter == job.spec.adapter.spec.to_dict()
        assert job.served_before == () and job.id not in [s.job_id for s in runner.weights.segments]
    assert sorted(executor.ended_adapter_jobs) == sorted([a.id, b.id])
    assert runner.adapter_names() == ["a", "b"] and runner.adapter("b") is b
    assert a.trained_on == b.trained_on == "default"  # the served weights' label when they started
    assert base.status is JobStatus.SUCCEEDED  # the base queue runs once no adapter trains
    with pytest.raises(NotFound):
        runner.adapter("never")


def test_an_adapter_job_waits_for_no_base_job_but_is_refused_while_one_runs():
    async def main():
        runner, executor = make_runner(chunk_target_s=0.0)
        executor.gate = threading.Event()
        base = runner.submit(spec(3))
        await asyncio.sleep(0.05)
        try:
            runner.submit(adapter_spec(2, "a"))
            refused = None
        except Conflict as exc:
            refused = str(exc)
        executor.gate.set()
        await base.done.wait()
        return refused

    assert "served weights" in asyncio.run(main())
