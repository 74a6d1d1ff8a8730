"""``/mezo/weights``, ``/mezo/reset``, ``/mezo/save``: what the served weights are, putting them back exactly, and
writing them out as a checkpoint."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from sglang.srt.utils.auth import AuthLevel, auth_level

from sglang_mezo.jobs.errors import Conflict, InvalidRequest

from ..context import Context
from ..errors import MezoRoute
from ..schemas import ResetRequest, SaveOut, SaveRequest, WeightsOut

router = APIRouter(prefix="/mezo", tags=["mezo"], route_class=MezoRoute)


@router.get("/weights")
@auth_level(AuthLevel.NORMAL)
async def weights(mezo: Context) -> WeightsOut:
    """The base checkpoint and the jobs' steps the served weights carry, in order, and their SGLang label."""
    return WeightsOut.of(mezo.runner.weights)


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
    mezo_history.json, the trajectories from the base). Serving waits while the files are written."""
    path = Path(request.path)
    if not path.is_absolute():
        raise InvalidRequest(f"path must be absolute on the server, got {request.path!r}")
    try:
        if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not request.overwrite)):
            raise Conflict(f"{request.path} exists and is not an empty folder (set overwrite to write into it)")
        if path.resolve() == Path(mezo.base_model).resolve():
            raise Conflict("refusing to overwrite the base checkpoint: resets re-read it")
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:  # permissions, a NUL byte in the path, ...
        raise InvalidRequest(f"cannot write to {request.path}: {exc}") from exc
    return SaveOut.of(str(path), await mezo.runner.weights.save(str(path)))
