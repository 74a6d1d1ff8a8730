"""The records between the job runner and the scheduler (``sglang_mezo.protocol``) and SGLang's envelopes for them
(``sglang_mezo.scheduler.messages``): they cross the process boundary as pickles, whole and typed."""

from __future__ import annotations

import pickle

import pytest

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.objectives import ChoiceExample, CompletionExample, Objective
from sglang_mezo.core.params import ParamSelection
from sglang_mezo.core.spsa import AbortedProbes, StepResult
from sglang_mezo.core.trajectory import Trajectory
from sglang_mezo.kernels import ZKind
from sglang_mezo.protocol import (AbortedStep, ChunkOutcome, Failure, FailureKind, RestoreOutcome, SaveOutcome,
                                  StepChunk, StepReport, weight_version_label)
from sglang_mezo.scheduler.messages import MezoChunkReqInput, MezoReqOutput, MezoRestoreReqInput, MezoSaveReqInput

CONFIG = MezoConfig(lr=1e-4, z_kind=ZKind.RADEMACHER, total_steps=10, seed=3,
                    selection=ParamSelection(include=("mlp",), last_layers=2))
BATCH = (CompletionExample((1, 2), (3,)), ChoiceExample((1,), ((4,), (5, 6)), 1))


def test_every_message_survives_the_pickle_sglang_sends_it_as():
    result = StepResult((11, 12), (1.0, 2.0), (1.5, 2.5), (-250.0, -250.0), 1e-4, 0.0, 1e-3)
    trajectory = Trajectory(z_kind=ZKind.RADEMACHER, trainable_fingerprint="f", trainable_names=["a"])
    trajectory.append(0, result)
    messages = [
        MezoChunkReqInput(chunk=StepChunk("job", CONFIG, Objective.CLASSIFICATION, (4, 5), (BATCH, BATCH[:1]))),
        MezoRestoreReqInput(history=(trajectory,), weight_version="mezo-job-1"),
        MezoSaveReqInput(path="/tmp/x"),
        MezoReqOutput(outcome=ChunkOutcome(
            reports=(StepReport(4, result, 12.5),), aborted=AbortedStep(5, AbortedProbes((13,), 1e-3, 2)),
            failure=Failure(FailureKind.STEP_FAILED, "boom"), trainable_fingerprint="f", trainable_names=("a",))),
        MezoReqOutput(outcome=RestoreOutcome(failure=Failure(FailureKind.CHECKPOINT, "gone"),
                                             weights_consistent=False)),
        MezoReqOutput(outcome=SaveOutcome(weight_version="v", tensors=("a",), message="saved")),
    ]
    for message in messages:
        copy = pickle.loads(pickle.dumps(message))
        assert type(copy) is type(message) and copy == message
    chunk = pickle.loads(pickle.dumps(messages[0])).chunk
    assert chunk.config.lr_at(5) == CONFIG.lr_at(5) and chunk.batches[0][1].option_ids == ((4,), (5, 6))
    assert pickle.loads(pickle.dumps(messages[1])).history[0].records == trajectory.records


def test_a_chunk_holds_consecutive_steps_with_one_batch_each():
    with pytest.raises(ValueError, match="one batch per step"):
        StepChunk("job", CONFIG, Objective.CROSS_ENTROPY, (0, 1), (BATCH,))
    with pytest.raises(ValueError, match="consecutive"):
        StepChunk("job", CONFIG, Objective.CROSS_ENTROPY, (0, 2), (BATCH, BATCH))
    with pytest.raises(ValueError):
        StepChunk("job", CONFIG, Objective.CROSS_ENTROPY, (), ())


def test_weight_version_labels_name_one_state_each():
    assert weight_version_label("abc", 7) == "mezo-abc-7"
    assert weight_version_label("abc", 7, aborted=True) == "mezo-abc-7-aborted"
