"""Training jobs, in the HTTP process: what a user submits (:mod:`.spec`), a job as it runs (:mod:`.job`), the queue
that runs them chunk by chunk (:mod:`.runner`), what the served weights are and putting them back
(:mod:`.served`), evaluation and the ε diagnostic, and data files through prompt templates.

Jobs reach the scheduler through :class:`sglang_mezo.protocol.ChunkExecutor`, which the server implements over
SGLang's IPC; they never import the plugin, the scheduler side or SGLang.
"""
