"""The journal of the served history (``sglang_mezo.jobs.journal``) with the real job runner over the fake executor:
what it reads back is what the runner did (jobs, statuses, evaluations, the served history, its label), replaying
it gives the served weights bit for bit, a job cut off mid-run comes back as interrupted with its committed steps,
and a record cut short is dropped while anything else damaged stops the launch."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch
from fakes import FakeExecutor, FakeScorer, replayed
from tiny_models import memorisation_task, tiny_llama

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.lora import LoraSpec
from sglang_mezo.core.objectives import Objective
from sglang_mezo.jobs.errors import Unavailable
from sglang_mezo.jobs.job import JobStatus
from sglang_mezo.jobs.journal import JOURNAL, Journal, JournalError, read
from sglang_mezo.jobs.runner import JobRunner
from sglang_mezo.jobs.spec import JobSpec
from sglang_mezo.kernels import ZKind
from sglang_mezo.protocol import AdapterTarget, FailureKind

EXAMPLES = tuple(memorisation_task(n=4, seed=3))


def spec(steps: int, seed: int) -> JobSpec:
    config = MezoConfig(lr=1e-2, z_kind=ZKind.RADEMACHER, total_steps=steps, seed=seed, n_probes=2)
    return JobSpec(examples=EXAMPLES, objective=Objective.CROSS_ENTROPY, config=config, batch_size=2,
                   eval_examples=EXAMPLES[:2], eval_every=2)


@pytest.fixture
def base(tmp_path) -> str:
    tiny_llama(0).save_pretrained(tmp_path / "base")  # the fake executor's model
    return str(tmp_path / "base")


def journaled_runner(state_dir, base: str) -> tuple[JobRunner, FakeExecutor, Journal]:
    journal = Journal(state_dir)
    state = journal.open(base, "default")
    executor = FakeExecutor()
    runner = JobRunner(executor, FakeScorer(executor), yield_s=0.0, chunk_target_s=0.0, journal=journal,
                       journaled=state, base_weight_version=state.base_weight_version)
    return runner, executor, journal


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_journal_reads_back_what_the_runner_did(tmp_path, base):
    async def main():
        runner, executor, _ = journaled_runner(tmp_path / "state", base)
        first = runner.submit(spec(4, seed=1))
        failed = runner.submit(spec(5, seed=2))
        executor.faults.raise_at.add((failed.id, 3))
        await failed.done.wait()
        await runner.reset(first.id, 3)  # the served weights: the first job's first 3 steps
        torn = runner.submit(spec(4, seed=4))
        executor.faults.torn_at.add((torn.id, 2))  # recovered at once: a "served" record too
        await torn.done.wait()
        return runner, executor

    runner, executor = asyncio.run(main())
    state = read(tmp_path / "state" / JOURNAL)
    assert {j.id: j.status for j in state.jobs.values()} == {j.id: j.status.value for j in runner.jobs.values()}
    for job in runner.jobs.values():
        entry = state.jobs[job.id]
        assert entry.reports == job.reports and entry.trajectory.records == job.trajectory.records
        assert [(s, m, v) for s, m, v in entry.evals] == [(e.step, e.metrics, e.weight_version) for e in job.evals]
        assert entry.failure == job.failure
    assert state.weight_version() == runner.weights.weight_version
    assert [(job_id, len(t.records)) for job_id, t in state.history()] == [
        (s.job_id, len(s.trajectory.records)) for s in runner.weights.segments]
    assert_same(executor.weights(), replayed(executor, [t for _, t in state.history()]))

    # a runner started on the journal lists the same jobs and serves the same history
    again, _, _ = journaled_runner(tmp_path / "state", base)
    assert again.weights.weight_version == runner.weights.weight_version
    assert {j: (again.jobs[j].status, again.jobs[j].steps_done, again.jobs[j].best_eval) for j in again.jobs} == {
        j: (runner.jobs[j].status, runner.jobs[j].steps_done, runner.jobs[j].best_eval) for j in runner.jobs}


def test_a_job_cut_off_comes_back_interrupted_with_its_committed_steps(tmp_path, base):
    async def main():
        runner, executor, _ = journaled_runner(tmp_path / "state", base)
        executor.gate, executor.hold_from = threading.Event(), 3  # the process "dies" before step 3 returns
        job = runner.submit(spec(20, seed=5))
        while job.steps_done < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return executor, job

    executor, job = asyncio.run(main())
    state = read(tmp_path / "state" / JOURNAL)
    entry = state.jobs[job.id]
    assert entry.status == "failed" and entry.failure.kind is FailureKind.INTERRUPTED
    assert str(job.steps_done) in entry.failure.message and len(entry.reports) == job.steps_done
    assert state.weight_version() == f"mezo-{job.id}-{job.steps_done}"
    # what a restarted scheduler replays is what was served when the process died
    assert_same(executor.weights(), replayed(executor, [t for _, t in state.history()]))
    again, _, _ = journaled_runner(tmp_path / "state", base)
    assert again.jobs[job.id].status is JobStatus.FAILED and again.jobs[job.id].done.is_set()


def test_a_record_cut_short_is_dropped_and_damage_elsewhere_stops_the_launch(tmp_path, base):
    async def run_one():
        runner, _, _ = journaled_runner(tmp_path / "state", base)
        job = runner.submit(spec(2, seed=6))
        await job.done.wait()

    asyncio.run(run_one())
    path = tmp_path / "state" / JOURNAL
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"kind":"chunk","job_id":"abc","st')  # killed mid-write
    assert len(read(path).jobs) == 1 and path.read_bytes() == whole  # dropped, and cut from the file
    asyncio.run(run_one())  # appending goes on after the last whole record
    assert len(read(path).jobs) == 2

    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b"{not a record", *lines[1:]]))
    with pytest.raises(JournalError, match="line 2"):
        read(path)
    path.write_bytes(whole)
    tiny_llama(1).save_pretrained(tmp_path / "other")
    with pytest.raises(JournalError, match="another base checkpoint"):
        Journal(tmp_path / "state").open(str(tmp_path / "other"), "default")


def test_a_journal_that_cannot_be_written_stops_training_and_says_so(tmp_path, base):
    """/dev/full answers every write with ENOSPC: a real disk-full. The job that could not be journaled stops, with
    its steps served and listed; nothing more trains until a restart; the reason is in the job and the refusal."""
    async def main():
        runner, executor, journal = journaled_runner(tmp_path / "state", base)
        first = runner.submit(spec(3, seed=7))
        await first.done.wait()
        journal.path.unlink()
        journal.path.symlink_to("/dev/full")
        second = runner.submit(spec(3, seed=8))
        await second.done.wait()
        with pytest.raises(Unavailable, match="cannot be written"):
            runner.submit(spec(1, seed=9))
        return runner, executor, first, second

    runner, executor, first, second = asyncio.run(main())
    assert first.status is JobStatus.SUCCEEDED
    assert second.status is JobStatus.FAILED and "cannot be written" in second.failure.message
    assert_same(executor.weights(), replayed(executor, [s.trajectory for s in runner.weights.segments]))


def test_only_a_local_safetensors_checkpoint_can_be_a_journals_base(tmp_path):
    (tmp_path / "hub-like").mkdir()
    with pytest.raises(JournalError, match="local folder of safetensors"):
        Journal(tmp_path / "state").open(str(tmp_path / "hub-like"), "default")


def test_adapter_jobs_are_journaled_apart_from_the_served_weights(tmp_path, base):
    adapter = AdapterTarget("tenant", LoraSpec(rank=2, alpha=4, target_modules=("q_proj", "v_proj")))

    async def main():
        runner, executor, _ = journaled_runner(tmp_path / "state", base)
        trained = runner.submit(dataclasses.replace(spec(3, seed=1), adapter=adapter))
        await trained.done.wait()
        again = runner.submit(dataclasses.replace(spec(2, seed=2), adapter=adapter))  # the name's next version
        await again.done.wait()
        return runner, again

    runner, again = asyncio.run(main())
    state = read(tmp_path / "state" / JOURNAL)
    assert state.served == [] and state.weight_version() == "default"  # the base never carried them
    [served] = state.adapters()
    assert (served.name, served.lora_id) == ("tenant", f"mezo-{again.id}-2")
    assert served.trajectory.records == again.trajectory.records and served.spec == adapter.spec
    restarted, _, _ = journaled_runner(tmp_path / "state", base)
    assert restarted.adapter_names() == ["tenant"]
    job = restarted.adapter("tenant")
    assert job.id == again.id and job.adapter_version == again.adapter_version
    assert job.spec.adapter == adapter and job.trajectory.adapter == adapter.spec.to_dict()
    assert job.trained_on == again.trained_on == "default"
