"""``sglang_mezo.server``: the ``/mezo/*`` HTTP API in SGLang's HTTP process: routes by resource, their pydantic
schemas, the one error table, the request translation, and the job runner's interfaces over SGLang's tokenizer
manager. :func:`sglang_mezo.server.app.mount` puts it all on SGLang's FastAPI app."""
