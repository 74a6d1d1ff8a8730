"""``/mezo/weights``, ``/mezo/reset``, ``/mezo/save``: what the served weights are, putting them back exactly, and
writing them out as a checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import torch
from fastapi import APIRouter, Request
from sglang.srt.utils.auth import AuthLevel, auth_level

from sglang_mezo.core.lora import replay_adapter, save_peft_adapter
from sglang_mezo.jobs.errors import InvalidRequest, Unavailable
from sglang_mezo.jobs.job import Job
from sglang_mezo.jobs.served import SaveReport

from ..context import Context, MezoContext
from ..errors import MezoRoute
from ..schemas import ResetRequest, SaveOut, SaveRequest, WeightsOut

router = APIRouter(prefix="/mezo", tags=["mezo"], route_class=MezoRoute)


@router.get("/weights")
@auth_level(AuthLevel.NORMAL)
async def weights(request: Request, mezo: Context,
                  fingerprint: Literal["0", "1", "false", "true"] = "0") -> WeightsOut:
    """The base checkpoint and the jobs' steps the served weights carry, in order, and their SGLang label; the
    trained adapters served beside them. ``?fingerprint=1`` adds each data-parallel replica's SHA-256 of the weights
    jobs can move, computed now on the scheduler (between batches; a full pass over those weights)."""
    unknown = sorted(set(request.query_params) - {"fingerprint"})
    if unknown:  # a misspelt fingerprint must not quietly answer without the fingerprints
        raise InvalidRequest(f"unknown query parameter(s) {unknown}: GET /mezo/weights takes only fingerprint=1")
    # the four spellings only: a boolean query would also take "on", "yes", "t", … which the schema does not say
    fingerprints = await mezo.runner.weights.fingerprints() if fingerprint in ("1", "true") else None
    out = WeightsOut.of(mezo.runner.weights, precision=mezo.precision,
                        adapters=[mezo.runner.adapter(name) for name in mezo.runner.adapter_names()],
                        fingerprints=fingerprints)
    role = mezo.fleet
    if role is not None and not role.leads:  # a member serves the leader's weights; their history is the leader's
        out = out.model_copy(update={"weight_version": role.weight_version, "history": [], "message": (
            f"a member of a fleet: these weights are the leader's (their history: GET {role.leader_url}"
            "/mezo/weights)")})
    return out


@router.post("/reset")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def reset(request: ResetRequest, mezo: Context) -> WeightsOut:
    """Re-read the trainable tensors from the checkpoint and replay the kept history exactly: the weights are
    bit-identical to the ones served at that point (no model reload)."""
    message = await mezo.runner.reset(request.job_id, request.step)
    return WeightsOut.of(mezo.runner.weights, message)


@router.post("/save")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def save(request: SaveRequest, mezo: Context) -> SaveOut:
    """Write the served weights, at the moment the scheduler handles this request, as an HF checkpoint (plus
    mezo_history.json, the trajectories from the base) into a folder of ``--mezo-output-dir``. Serving waits while
    the files are written."""
    job = None if request.adapter is None else mezo.runner.adapter(request.adapter)  # 404 before any file
    try:
        target = await asyncio.to_thread(mezo.files.checkpoint_target, request.path, request.overwrite)
    except OSError as exc:  # permissions, a full disk: the server's problem, not the request's
        raise Unavailable(f"cannot create {request.path} in the output folder: {exc.strerror}") from exc
    try:
        if request.adapter is not None:
            report = await asyncio.to_thread(save_adapter, job, mezo, target.staging, request.dtype == "float32")
        else:
            report = await mezo.runner.weights.save(str(target.staging), float32=request.dtype == "float32")
        await asyncio.to_thread(target.commit)
    except BaseException as exc:
        await asyncio.to_thread(target.abandon)  # an earlier checkpoint of that name stays as it was
        if isinstance(exc, OSError):
            raise Unavailable(f"cannot put {request.path} in place in the output folder: {exc.strerror}") from exc
        raise
    return SaveOut.of(str(target.final), report)


def save_adapter(job: Job, mezo: MezoContext, folder: Path, float32: bool) -> SaveReport:
    """The adapter version ``job`` serves, rebuilt from its trajectory (seeded start + recorded updates, exactly
    the scheduler's master), written as a PEFT folder with the trajectory beside it."""
    assert job.adapter_version is not None and job.trajectory is not None and job.spec.adapter is not None
    version = job.adapter_version
    trajectory = job.trajectory.upto(version.committed_steps)
    spec = job.spec.adapter.spec
    tensors = replay_adapter(mezo.lora.dims, spec, trajectory.records, trajectory.z_kind)
    dtype = torch.float32 if float32 else getattr(torch, mezo.precision.served_dtype)
    save_peft_adapter(folder, tensors, spec.peft_config(mezo.base_model), dtype=dtype)
    trajectory.save(folder / "mezo_trajectory.json")
    return SaveReport(weight_version=version.label, tensors=tuple(tensors),
                      message=f"adapter {version.name} at step {version.committed_steps} written as a PEFT folder")
