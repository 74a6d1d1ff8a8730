"""The SGLang plugin: entry point ``sglang.srt.plugins`` -> :func:`register`.

SGLang calls :func:`register` in every process it starts (the HTTP/main process before the CLI is parsed, and
each scheduler, detokenizer and DP-controller process, all started with ``spawn``). It only registers hooks: no
import-time side effects, no environment changes, and it tolerates being called more than once.

Hook ledger (target in SGLang 0.5.23 — why — how):

| target | why | how |
|---|---|---|
| ``srt.server_args.ServerArgs.add_cli_args`` | add ``--enable-mezo`` and ``--mezo-*`` flags | AFTER: adds an argument group |
| ``srt.server_args.ServerArgs.from_cli_args`` | ``ServerArgs`` is sealed: keep our values | AFTER: sets ``ServerArgs._mezo`` |

Research notes on these and the next targets (routes, IPC, the scheduler-side step): ``docs/notes/``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
_FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"

_registered = False


def register() -> None:
    """Register sglang-mezo's hooks with SGLang's hook registry (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_ADD_CLI_ARGS, _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(_FROM_CLI_ARGS, _after_from_cli_args, HookType.AFTER)
    _registered = True


def _after_add_cli_args(result, parser) -> None:
    from .options import add_cli_args

    add_cli_args(parser)


def _after_from_cli_args(server_args, cls, namespace) -> None:
    from .options import ATTRIBUTE, from_namespace

    try:
        options = from_namespace(namespace)
    except ValueError as exc:
        raise SystemExit(f"sglang-mezo: {exc}") from exc
    setattr(server_args, ATTRIBUTE, options)
    if options.enabled:
        logger.info("MeZO enabled: %s", options)
