"""Every error status of the ``/mezo/*`` API, from one table (:data:`STATUS`), and the one shape of an error body.

Each kind of answer is an exception class of :mod:`sglang_mezo.jobs.errors`; :data:`STATUS` gives its status. The
README's "Errors" table says when each is answered (``tests/test_routes.py`` holds it to :data:`STATUS`). The body
is SGLang's own error shape (``{"object": "error", "message", "type", "param", "code"}``), with ``type`` the
error's kind. Request validation errors become :class:`InvalidRequest` in the routes' own route class
(:class:`MezoRoute`), so the API answers the same in SGLang's app and in any other; SGLang's handlers for its own
routes are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from sglang_mezo.jobs.errors import (Conflict, Forbidden, InvalidRequest, JobFailed, MezoError, NotFound, TooLarge,
                                    TooMany, Unavailable)

logger = logging.getLogger(__name__)

STATUS: dict[type[MezoError], int] = {
    InvalidRequest: 400,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    JobFailed: 422,
    TooMany: 429,
    Unavailable: 503,
}


def status_of(exc: MezoError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(exc: MezoError) -> JSONResponse:
    status = status_of(exc)
    if status >= 500:
        logger.warning("MeZO: %s: %s", exc.kind, exc)
    return JSONResponse({"object": "error", "message": str(exc), "type": exc.kind, "param": None, "code": status},
                        status_code=status)


async def _handle(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MezoError)
    return error_response(exc)


def install(app: FastAPI) -> None:
    """Answer every :class:`MezoError` raised by a route of ``app`` as the table above says."""
    app.add_exception_handler(MezoError, _handle)


def _validation_message(exc: RequestValidationError) -> str:
    """Where and what, for each problem (pydantic's own words); never the submitted values."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


class MezoRoute(APIRoute):
    """The routes' class: a body that does not validate raises :class:`InvalidRequest` (a 400 in the shape
    above) rather than reaching the app's generic validation handler."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def validated(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                raise InvalidRequest(_validation_message(exc)) from None
            except HTTPException as exc:  # FastAPI's own, reading the body: "There was an error parsing the body", …
                mapped = {400: InvalidRequest, 413: TooLarge}.get(exc.status_code)
                if mapped is None:
                    raise
                raise mapped(str(exc.detail)) from None

        return validated
