"""IPC messages between the HTTP process (job runner) and the scheduler(s).

A chunk message carries steps of one job, already tokenized: the scheduler runs them back to back, with no user
batch in between, and answers with the result of every committed step. A restore message resets the trainable
weights to the base checkpoint and replays a history of trajectories onto them. Every request is answered with
one :class:`MezoReqOutput`. SGLang pickles control messages
(and the TP broadcast always does), so these classes must be importable from every process: they are.
"""

from __future__ import annotations

import msgspec
from sglang.srt.managers.io_struct import BaseReq


class MezoChunkReqInput(BaseReq, kw_only=True):
    job_id: str
    config: dict
    """``MezoConfig.to_dict()``: the hyper-parameters; step k's seeds derive from ``config["seed"]``."""
    objective: str
    steps: list[int]
    """0-based step indices of this chunk (the schedule and the seeds depend on them)."""
    batches: list[list[dict]]
    """Per step, its examples: ``{"prompt": ids, "completion": ids}`` or ``{"prompt": ids, "options": [ids...],
    "label": i}``."""


class MezoRestoreReqInput(BaseReq, kw_only=True):
    history: list[dict]
    """``Trajectory.to_dict()`` of each job whose steps the served weights should carry, in the order they ran
    (empty: the base checkpoint)."""
    weight_version: str
    """SGLang's weight version label of the restored weights (see
    :func:`sglang_mezo.jobs.executor.weight_version_label`)."""


class MezoSaveReqInput(BaseReq, kw_only=True):
    path: str
    """A folder every TP rank can write to (they share it): the served weights go there as an HF checkpoint."""


class MezoReqOutput(BaseReq, kw_only=True):
    success: bool
    message: str = ""
    results: list[dict] = msgspec.field(default_factory=list)
    """One entry per committed step, in order (also when a later step of the chunk failed)."""
    aborted: dict | None = None
    """The step that failed after perturbing, if one did: ``{"step", "seeds", "eps", "passes"}``
    (:class:`sglang_mezo.core.spsa.AbortedProbes`), for the trajectory."""
    inconsistent: bool = False
    """A weight pass failed part-way: the served weights are at no committed step."""
    trainable_fingerprint: str = ""
    trainable_names: list[str] = msgspec.field(default_factory=list)
    weight_version: str | None = None
    """The weight version label SGLang now serves with, if the weights changed."""
    info: dict = msgspec.field(default_factory=dict)
    """What a request other than a chunk reports (a save: the label of the saved weights, the tensors written)."""

