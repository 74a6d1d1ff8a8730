"""OpenAI's files and fine-tuning routes (``/v1/files``, ``/v1/fine_tuning/jobs``), the fine-tuned names in
``/v1/models``, and the check that a chat or completion request naming a fine-tuned model is served by its weights.

Authentication is the ``/mezo`` API's: what changes the server (uploads, deletes, jobs, cancels, file contents)
needs the admin key where one is set (SGLang's ``--admin-api-key``, else ``--api-key``); reads need the API key.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Literal

import zstandard
from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response, StreamingResponse
from sglang.srt.utils.auth import AuthLevel, auth_level
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sglang_mezo.jobs.errors import InvalidRequest, MezoError, NotFound, Unavailable

from ..context import Context, MezoContext
from ..errors import MezoRoute, error_response
from ..sse import polled
from .schemas import FileDeleted, FileOut, JobCreate, JobOut, ListOut
from .service import FINISHED, FineTuning, FineTuningJob

router = APIRouter(prefix="/v1", tags=["openai fine-tuning"], route_class=MezoRoute)
models_router = APIRouter(prefix="/v1", tags=["openai fine-tuning"], route_class=MezoRoute)

Limit = Annotated[int, Query(ge=1, le=100)]
FileLimit = Annotated[int, Query(ge=1, le=10_000)]  # OpenAI's bounds for files (default: all of them)
POLL_S = 0.2


def fine_tuning(mezo: Context) -> FineTuning:
    if mezo.fine_tuning is None:
        raise Unavailable("OpenAI fine-tuning is not set up on this server")
    return mezo.fine_tuning


Service = Annotated[FineTuning, Depends(fine_tuning)]


def job_in_path(job_id: str, service: Service) -> FineTuningJob:
    return service.get(job_id)


PathJob = Annotated[FineTuningJob, Depends(job_in_path)]


def page(items: Sequence, after: str | None, limit: int) -> ListOut:
    """OpenAI's cursor pagination over ``items`` (newest first): those after the one with id ``after``."""
    start = 0
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            raise InvalidRequest(f"after: no item {after!r} in this list")
        start = ids.index(after) + 1
    chosen = list(items[start : start + limit])
    return ListOut(data=chosen, has_more=start + limit < len(items), first_id=chosen[0].id if chosen else None,
                   last_id=chosen[-1].id if chosen else None)


# -- files ------------------------------------------------------------------------------------------------------------


@router.post("/files")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def upload(mezo: Context, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> FileOut:
    """Keep a training or validation file (``purpose`` ``fine-tune``; at most ``--mezo-max-body-mb``)."""
    data = await file.read()
    stored = await asyncio.to_thread(mezo.openai_files.create, file.filename or "upload.jsonl", purpose, data)
    return FileOut(**stored.to_openai())


@router.get("/files")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def list_files(mezo: Context, purpose: str | None = None, after: str | None = None,
                     limit: FileLimit = 10_000, order: Literal["asc", "desc"] = "desc") -> ListOut:
    """Newest first (``order=asc``: oldest first)."""
    files = [FileOut(**f.to_openai()) for f in mezo.openai_files.list(purpose)]
    return page(files if order == "desc" else files[::-1], after, limit)


@router.get("/files/{file_id}")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def get_file(file_id: str, mezo: Context) -> FileOut:
    return FileOut(**mezo.openai_files.get(file_id).to_openai())


@router.get("/files/{file_id}/content", response_class=Response)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def file_content(file_id: str, mezo: Context) -> Response:
    path = mezo.openai_files.path(file_id)
    return Response(await asyncio.to_thread(path.read_bytes), media_type="application/octet-stream")


@router.delete("/files/{file_id}")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def delete_file(file_id: str, mezo: Context) -> FileDeleted:
    mezo.openai_files.delete(file_id)
    return FileDeleted(id=file_id)


# -- fine-tuning jobs -------------------------------------------------------------------------------------------------


@router.post("/fine_tuning/jobs")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def create_job(request: JobCreate, service: Service, mezo: Context) -> JobOut:
    """Validate the files (status ``validating_files``), then queue a MeZO job; a bad file fails the job with
    OpenAI's error object, never the request."""
    if mezo.precision.refusal:
        raise InvalidRequest(mezo.precision.refusal)
    return service.out(service.create(request))


@router.get("/fine_tuning/jobs")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def list_jobs(service: Service, after: str | None = None, limit: Limit = 20) -> ListOut:
    jobs = [service.out(ft) for ft in reversed(service.jobs.values())]
    return page(jobs, after, limit)


@router.get("/fine_tuning/jobs/{job_id}")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def get_job(ft: PathJob, service: Service) -> JobOut:
    return service.out(ft)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def cancel_job(ft: PathJob, service: Service) -> JobOut:
    return service.out(service.cancel(ft))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=None)
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def job_events(ft: PathJob, mezo: Context, after: str | None = None, limit: Limit = 20,
                     stream: bool = False) -> ListOut | StreamingResponse:
    """Newest first, paginated; with ``stream=true``, Server-Sent Events of each event as it happens (oldest
    first, from the start or after ``after``) until the job ends."""
    if not stream:
        return page(ft.events[::-1], after, limit)
    start = 0
    if after is not None:
        ids = [e.id for e in ft.events]
        if after not in ids:
            raise InvalidRequest(f"after: no event {after!r} in this job")
        start = ids.index(after) + 1
    return StreamingResponse(mezo.streams.hold(_event_stream(ft, start)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event_stream(ft: FineTuningJob, start: int) -> AsyncIterator[str]:
    """Each event from ``start`` on as it happens, then ``[DONE]`` (OpenAI's end of a stream) once the job ends."""
    sent = start

    def poll() -> tuple[list[str], bool]:
        nonlocal sent
        finished = ft.status in FINISHED  # read before the events: none is missed
        new = [f"data: {e.model_dump_json()}\n\n" for e in ft.events[sent:]]
        sent += len(new)
        return new + ["data: [DONE]\n\n"] * finished, finished

    return polled(poll, POLL_S)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def job_checkpoints(ft: PathJob, service: Service, after: str | None = None, limit: Limit = 10) -> ListOut:
    return page(service.checkpoints(ft), after, limit)


# -- models -----------------------------------------------------------------------------------------------------------


def _card(model_id: str, parent: str | None, mezo: MezoContext) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "sglang", "root": model_id,
            "parent": parent, "max_model_len": mezo.translator.context_len}


@models_router.get("/models")
@auth_level(AuthLevel.NORMAL)
async def models(mezo: Context, service: Service) -> dict:
    """SGLang's base model and every fine-tuned name of this server (served now or not; a request names one only
    while its weights are served)."""
    cards = [_card(service.model_name, None, mezo)]
    for name in service.model_names():
        cards.append(_card(name, service.model_name, mezo))
    # adapters trained through /mezo, as SGLang's OpenAI routes reach them: "<base>:<adapter>" (those of OpenAI jobs
    # are listed above under their ft: names)
    for name in mezo.runner.adapter_names():
        if not service.is_fine_tuned_adapter(name):
            cards.append(_card(f"{service.model_name}:{name}", service.model_name, mezo))
    return {"object": "list", "data": cards}


@models_router.get("/models/{model:path}")
@auth_level(AuthLevel.NORMAL)
async def model(model: str, mezo: Context, service: Service) -> dict:
    if model == service.model_name:
        return _card(model, None, mezo)
    if service.served_version(model) is None:
        raise MezoModelNotFound(f"the model {model!r} does not exist on this server")
    return _card(model, service.model_name, mezo)


class MezoModelNotFound(NotFound):
    kind = "model_not_found"


# -- requests naming a fine-tuned model ---------------------------------------------------------------------------


GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


class FineTunedModelNames:
    """ASGI middleware: a chat or completion request whose ``model`` is a fine-tuned name of this server is served
    by the base engine (the weights are one) when that name's weights are the served ones, and refused with a 4xx
    otherwise; without this, SGLang would read ``ft:…:…`` as ``<model>:<LoRA adapter>``. An adapter fine-tune is
    passed on as ``<base>:<adapter>``, SGLang's own name for it. Other requests pass as they were."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        compressed = dict(scope.get("headers") or []).get(b"x-body-compressed")
        if compressed is not None:  # SGLang's optional decompression runs inside this middleware: read it here too
            plain = await asyncio.to_thread(_decompressed, compressed, body)
            if plain is not None and _may_name_fine_tuned(plain):
                rewritten = self._rewritten(scope, plain)
                if rewritten is not plain:  # a fine-tuned name: answered, or passed on as plain JSON
                    body = rewritten
                    scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"x-body-compressed"]}
        elif _may_name_fine_tuned(body):
            body = self._rewritten(scope, body)
        if isinstance(body, Response):
            return await body(scope, receive, send)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await self.app(scope, replay, send)

    @staticmethod
    def _rewritten(scope: Scope, body: bytes) -> bytes | Response:
        """``body`` itself unless it names a fine-tuned model: then the refusal, or the body naming the base."""
        context: MezoContext | None = getattr(scope["app"].state, "mezo", None) if "app" in scope else None
        service = context.fine_tuning if context is not None else None
        try:
            request = json.loads(body)
        except ValueError:
            return body  # SGLang answers a body it cannot read
        model_name = request.get("model") if isinstance(request, dict) else None
        if service is None or not isinstance(model_name, str) or not model_name.startswith("ft:"):
            return body
        try:
            service.check_served(model_name)
        except MezoError as exc:
            return error_response(exc)
        return json.dumps({**request, "model": service.routed_model(model_name)}).encode()


def _may_name_fine_tuned(body: bytes) -> bool:
    """Whether a JSON body could name an ``ft:`` model: it spells ``ft:``, or holds a ``\\u`` escape (JSON's only
    other way to write those letters). Anything else passes unparsed: most requests name the base model."""
    return b"ft:" in body or b"\\u" in body


def _decompressed(method: bytes, body: bytes) -> bytes | None:
    """The body SGLang's request decompression (``x-body-compressed``) will read; None where SGLang will refuse
    it anyway (an unknown method, a corrupt body: its own 400)."""
    if method != b"zstd":  # the one method SGLang 0.5.23 decompresses
        return None
    try:
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
    except zstandard.ZstdError:
        return None
