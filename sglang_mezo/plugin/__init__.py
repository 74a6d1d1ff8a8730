"""The SGLang plugin: entry point ``sglang.srt.plugins`` -> :func:`register`.

SGLang calls :func:`register` in every process it starts (the HTTP/main process before the CLI is parsed, and
each scheduler, detokenizer and DP-controller process, all started with ``spawn``). It only registers hooks: no
import-time side effects, no environment changes, and it tolerates being called more than once. This is where the
layers meet: the hooks hand the scheduler to :mod:`sglang_mezo.scheduler` and SGLang's app to
:mod:`sglang_mezo.server`.

Hook ledger (every other SGLang internal we touch: :mod:`.internals`):

| target in SGLang 0.5.23 | why | how |
|---|---|---|
| ``srt.server_args.ServerArgs.add_cli_args`` | add ``--enable-mezo`` and ``--mezo-*`` flags | AFTER: adds an argument group |
| ``srt.server_args.ServerArgs.from_cli_args`` | ``ServerArgs`` is sealed: keep our values | AFTER: sets ``ServerArgs._mezo`` |
| ``srt.managers.scheduler.Scheduler.init_request_dispatcher`` | run chunks of steps on the scheduler thread | AFTER: adds our message handlers (only with ``--enable-mezo``) |
| ``srt.managers.tokenizer_control_mixin._COMMUNICATOR_SPECS`` | a fan-out communicator for our reply type | appends ``("mezo", MezoReqOutput)`` before the tokenizer manager is built |
| ``srt.entrypoints.http_server._setup_and_run_http_server`` | mount ``/mezo/*`` before uvicorn starts | BEFORE, main process only (only with ``--enable-mezo``) |
| ``srt.lora.lora_manager.LoRAManager`` (``__init__``, ``update_lora_info``, ``prepare_lora_batch``, ``load_lora_adapter``, ``load_lora_adapter_from_tensors``) | ``--enable-lora`` on a machine without CUDA: SGLang pins host tensors, which needs a driver (SGLang issue 31894) | AROUND, only in processes without CUDA: pinning off while they run (:mod:`.pinning`) |

Research notes on these targets (routes, IPC, the scheduler-side step): ``docs/notes/``.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import socket

from .internals import (
    CPU_LORA_HOOKS,
    HOOK_ADD_CLI_ARGS,
    HOOK_FROM_CLI_ARGS,
    HOOK_HTTP_SETUP,
    HOOK_SCHEDULER_DISPATCHER,
    HOOKS,
)

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Register sglang-mezo's hooks with SGLang's hook registry (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_ADD_CLI_ARGS.target, _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(HOOK_FROM_CLI_ARGS.target, _after_from_cli_args, HookType.AFTER)
    HookRegistry.register(HOOK_SCHEDULER_DISPATCHER.target, _after_scheduler_dispatcher, HookType.AFTER)
    if multiprocessing.parent_process() is None:  # the HTTP process: not worth importing FastAPI elsewhere
        HookRegistry.register(HOOK_HTTP_SETUP.target, _before_http_setup, HookType.BEFORE)
        _add_communicator_spec()
    if not _has_cuda():
        from .pinning import around_without_pinning

        for hook in CPU_LORA_HOOKS:
            HookRegistry.register(hook.target, around_without_pinning, HookType.AROUND)
    _registered = True


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _add_communicator_spec() -> None:
    from sglang.srt.managers import tokenizer_control_mixin

    from sglang_mezo.scheduler.messages import MezoReqOutput
    from sglang_mezo.server.sglang_adapters import COMMUNICATOR

    specs = tokenizer_control_mixin._COMMUNICATOR_SPECS
    if not any(spec[0] == COMMUNICATOR for spec in specs):
        specs.append((COMMUNICATOR, MezoReqOutput))


def _after_scheduler_dispatcher(result, scheduler) -> None:
    from sglang_mezo.options import options_of

    options = options_of(scheduler.server_args)
    if options.enabled:
        from sglang_mezo.scheduler.handler import install

        install(scheduler, options.resume, options.resume_base_version, options.master, options.resume_adapters,
                options.replica_address)


def _before_http_setup(server_args, tokenizer_manager, *args, **kwargs) -> None:
    from sglang_mezo.options import options_of

    options = options_of(server_args)
    if options.enabled:
        from sglang.srt.entrypoints import http_server

        from sglang_mezo.server.app import mount

        mount(http_server.app, server_args, tokenizer_manager, options)


def _after_add_cli_args(result, parser) -> None:
    from sglang_mezo.options import add_cli_args

    add_cli_args(parser)


def _missing_hooks() -> list[str]:
    """Targets SGLang's registry did not patch (it logs and carries on when a hook fails to apply)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    patched = getattr(HookRegistry, "_patched", None)
    if patched is None:  # a registry without the bookkeeping we read: nothing to check against
        return []
    return [hook.target for hook in HOOKS if hook.target not in patched]


def _refusal(namespace) -> str | None:
    """Why ``--enable-mezo`` cannot run with these arguments, if it cannot."""
    from sglang.srt.environ import envs

    missing = _missing_hooks()
    if missing:  # fail loudly: SGLang starts anyway when a plugin hook did not apply; --enable-mezo must not
        return f"--enable-mezo, but these SGLang hooks are not in place: {missing}"
    if getattr(namespace, "skip_tokenizer_init", False):
        return "--enable-mezo needs the tokenizer (training examples are text): drop --skip-tokenizer-init"
    if int(getattr(namespace, "dp_size", 1) or 1) > 1:
        if getattr(namespace, "enable_dp_attention", False):
            return ("--enable-mezo with --dp-size supports replicas of the whole model, not --enable-dp-attention "
                    "(its DP ranks share one TP group)")
    if not envs.SGLANG_USE_PICKLE_IPC.get():
        return "--enable-mezo needs SGLang's pickle IPC (SGLANG_USE_PICKLE_IPC=1, the default)"
    return None


def _after_from_cli_args(server_args, cls, namespace) -> None:
    from sglang_mezo.options import ATTRIBUTE, from_namespace

    try:
        options = from_namespace(namespace)
    except ValueError as exc:
        raise SystemExit(f"sglang-mezo: {exc}") from exc
    if options.enabled:
        refusal = _refusal(namespace)
        if refusal:
            raise SystemExit(f"sglang-mezo: {refusal}")
        if options.fleet is not None and not options.fleet.leads:
            options = _follow(options, server_args)
        elif options.state_dir:
            options = _resume(options, server_args)
        if int(server_args.dp_size or 1) > 1:
            options = dataclasses.replace(options, replica_address=_loopback_address())
    setattr(server_args, ATTRIBUTE, options)
    if options.enabled:
        logger.info("MeZO enabled: %s", options)
        if _open_to_the_network(namespace):
            logger.warning("MeZO: --enable-mezo on %s with no --api-key or --admin-api-key: anyone who can reach "
                           "this port can train, reset and save the served model", namespace.host)


def _resume(options, server_args):
    """Read the journal once, before any process serves: the served history goes to the schedulers with the options,
    and SGLang's weight version starts at the label of those weights."""
    import os

    from sglang_mezo.jobs.journal import Journal, JournalError

    try:
        state = Journal(options.state_dir).open(os.path.abspath(server_args.model_path), server_args.weight_version)
    except (JournalError, OSError) as exc:
        raise SystemExit(f"sglang-mezo: --mezo-state-dir: {exc}") from exc
    history = state.history()
    if history:
        server_args.weight_version = state.weight_version()
        logger.info("MeZO: the journal in %s serves %s (%d job(s) replayed at launch)", options.state_dir,
                    server_args.weight_version, len(history))
    return dataclasses.replace(options, resume=tuple(trajectory for _, trajectory in history),
                               resume_base_version=state.base_weight_version,
                               resume_adapters=tuple(state.adapters()))


def _follow(options, server_args):
    """A fleet's member serves the leader's weights from its first request: it asks the leader for its served
    history, which the schedulers replay at launch (as a journal's), and starts at the leader's label."""
    from sglang_mezo.server.app import fleet_bearer
    from sglang_mezo.server.fleet.follower import leader_history
    from sglang_mezo.server.fleet.relay import Relay

    fleet = options.fleet
    if options.state_dir:
        raise SystemExit("sglang-mezo: a fleet's member keeps no journal (the leader's is the fleet's history, "
                         "replayed at every launch): drop --mezo-state-dir")
    try:
        history = leader_history(Relay(fleet.secret(), fleet_bearer(server_args)), fleet.leader_url)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"sglang-mezo: {exc}") from exc
    server_args.weight_version = history.weight_version
    logger.info("MeZO fleet: rank %d of %d; the leader at %s serves %s (%d job(s) replayed at launch)", fleet.rank,
                fleet.size, fleet.leader_url, history.weight_version, len(history.trajectories))
    return dataclasses.replace(options, resume=history.trajectories, resume_base_version=history.base_weight_version)


def _loopback_address() -> str:
    """A free loopback port for the replicas' group: every replica of one server runs on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _open_to_the_network(namespace) -> bool:
    """No key protects the admin routes, and the server listens beyond this machine."""
    import ipaddress

    if getattr(namespace, "api_key", None) or getattr(namespace, "admin_api_key", None):
        return False
    host = str(getattr(namespace, "host", "") or "")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return True
