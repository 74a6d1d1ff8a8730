"""``sglang_mezo.server``: the ``/mezo/*`` HTTP API (FastAPI router and its pydantic models)."""
