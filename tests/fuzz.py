"""Drive every /mezo route with bodies generated from the API's own OpenAPI schema (schemathesis, on hypothesis),
seeded and bounded: every answer is a 2xx, or a 4xx with a message; never a 5xx, never a hang."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

TIMEOUT_S = 120
"""No answer within this is a hang (a job the request waits for included)."""


def mezo_operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    return [op for op in operations if op.path.startswith("/mezo/")]


def fuzz(url: str, mode: GenerationMode, examples: int, headers: dict[str, str] | None = None) -> dict[str, list]:
    """Up to ``examples`` generated requests per /mezo operation (valid ones, or invalid ones, as ``mode`` says);
    returns the statuses per operation. Fails on a 5xx, a 4xx without a message, or no answer in time."""
    seen: dict[str, list] = {}
    for operation in mezo_operations(url):
        statuses = seen.setdefault(f"{operation.method.upper()} {operation.path}", [])

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def one(case) -> None:
            response = case.call(headers=headers, timeout=TIMEOUT_S)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                body = response.json()
                assert body.get("message") or body.get("error"), (case.method, case.path, response.text[:500])

        try:
            one()
        except Unsatisfiable:  # nothing about this operation can be invalid (GET /mezo/jobs: no input at all)
            assert mode is GenerationMode.NEGATIVE, operation.path
    return seen
