"""Training jobs: what a user submits, how its steps are batched and run chunk by chunk, and what it produced.

Jobs reach the scheduler through :class:`~sglang_mezo.jobs.executor.ChunkExecutor`, which the plugin implements;
they never import the plugin or SGLang.
"""
