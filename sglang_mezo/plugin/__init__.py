"""The SGLang plugin: entry point ``sglang.srt.plugins`` -> :func:`register`.

SGLang calls :func:`register` in every process it starts (the HTTP/main process before the CLI is parsed, and
each scheduler, detokenizer and DP-controller process, all started with ``spawn``). It only registers hooks: no
import-time side effects, no environment changes, and it tolerates being called more than once.

Hook ledger (target in SGLang 0.5.23 — why — how):

| target | why | how |
|---|---|---|
| ``srt.server_args.ServerArgs.add_cli_args`` | add ``--enable-mezo`` and ``--mezo-*`` flags | AFTER: adds an argument group |
| ``srt.server_args.ServerArgs.from_cli_args`` | ``ServerArgs`` is sealed: keep our values | AFTER: sets ``ServerArgs._mezo`` |
| ``srt.managers.scheduler.Scheduler.init_request_dispatcher`` | run chunks of steps on the scheduler thread | AFTER: adds the ``MezoChunkReqInput`` handler (only with ``--enable-mezo``) |
| ``srt.managers.tokenizer_control_mixin._COMMUNICATOR_SPECS`` | a fan-out communicator for our reply type | appends ``("mezo", MezoReqOutput)`` before the tokenizer manager is built |
| ``srt.entrypoints.http_server._setup_and_run_http_server`` | mount ``/mezo/*`` before uvicorn starts | BEFORE, main process only (only with ``--enable-mezo``) |

Research notes on these and the next targets (routes, IPC, the scheduler-side step): ``docs/notes/``.
"""

from __future__ import annotations

import logging
import multiprocessing

logger = logging.getLogger(__name__)

_ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
_FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"
_SCHEDULER_DISPATCHER = "sglang.srt.managers.scheduler.Scheduler.init_request_dispatcher"
_HTTP_SETUP = "sglang.srt.entrypoints.http_server._setup_and_run_http_server"

_registered = False


def register() -> None:
    """Register sglang-mezo's hooks with SGLang's hook registry (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_ADD_CLI_ARGS, _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(_FROM_CLI_ARGS, _after_from_cli_args, HookType.AFTER)
    HookRegistry.register(_SCHEDULER_DISPATCHER, _after_scheduler_dispatcher, HookType.AFTER)
    if multiprocessing.parent_process() is None:  # the HTTP process: not worth importing FastAPI elsewhere
        HookRegistry.register(_HTTP_SETUP, _before_http_setup, HookType.BEFORE)
        _add_communicator_spec()
    _registered = True


def _add_communicator_spec() -> None:
    from sglang.srt.managers import tokenizer_control_mixin

    from .http_side import COMMUNICATOR
    from .messages import MezoReqOutput

    specs = tokenizer_control_mixin._COMMUNICATOR_SPECS
    if not any(spec[0] == COMMUNICATOR for spec in specs):
        specs.append((COMMUNICATOR, MezoReqOutput))


def _after_scheduler_dispatcher(result, scheduler) -> None:
    from .options import options_of

    if options_of(scheduler.server_args).enabled:
        from .scheduler_side import install

        install(scheduler)


def _before_http_setup(server_args, tokenizer_manager, *args, **kwargs) -> None:
    from .options import options_of

    options = options_of(server_args)
    if options.enabled:
        from sglang.srt.entrypoints import http_server

        from .http_side import mount_routes

        mount_routes(http_server.app, server_args, tokenizer_manager, options)


def _after_add_cli_args(result, parser) -> None:
    from .options import add_cli_args

    add_cli_args(parser)


HOOK_TARGETS = (_ADD_CLI_ARGS, _FROM_CLI_ARGS, _SCHEDULER_DISPATCHER, _HTTP_SETUP)

SGLANG_METHODS_CALLED = (
    "sglang.srt.managers.scheduler.Scheduler.pause_generation",
    "sglang.srt.managers.scheduler.Scheduler.continue_generation",
    "sglang.srt.managers.scheduler.Scheduler.flush_cache",
    "sglang.srt.managers.scheduler.Scheduler.record_weight_version_change",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.auto_create_handle_loop",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._update_weight_version_if_provided",
)
"""SGLang methods (not hooks) the plugin calls: a test checks they exist in the pinned version."""


def _missing_hooks() -> list[str]:
    """Targets SGLang's registry did not patch (it logs and carries on when a hook fails to apply)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    patched = getattr(HookRegistry, "_patched", None)
    if patched is None:  # a registry without the bookkeeping we read: nothing to check against
        return []
    return [t for t in HOOK_TARGETS if t not in patched]


def _after_from_cli_args(server_args, cls, namespace) -> None:
    from .options import ATTRIBUTE, from_namespace

    try:
        options = from_namespace(namespace)
    except ValueError as exc:
        raise SystemExit(f"sglang-mezo: {exc}") from exc
    setattr(server_args, ATTRIBUTE, options)
    if options.enabled:
        # Fail loudly: SGLang starts anyway when a plugin hook did not apply; --enable-mezo must not.
        missing = _missing_hooks()
        if missing:
            raise SystemExit(f"sglang-mezo: --enable-mezo, but these SGLang hooks are not in place: {missing}")
        if getattr(namespace, "skip_tokenizer_init", False):
            raise SystemExit("sglang-mezo: --enable-mezo needs the tokenizer (training examples are text): "
                             "drop --skip-tokenizer-init")
        if int(getattr(namespace, "dp_size", 1) or 1) > 1:
            raise SystemExit("sglang-mezo: --enable-mezo does not support data parallelism (--dp-size > 1) yet: "
                             "every replica would have to apply the same updates")
        logger.info("MeZO enabled: %s", options)
