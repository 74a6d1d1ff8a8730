"""Putting the ``/mezo/*`` API on a FastAPI app: the job runner over SGLang's tokenizer manager, the routes, the
error handler, and the context the routes depend on."""

from __future__ import annotations

import functools
import logging
import os
import uuid
from pathlib import Path
from collections.abc import Callable, Sequence

from fastapi import FastAPI

from sglang_mezo.checkpoint import CheckpointError, tensor_shapes, tensor_square_sums
from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.master import Precision
from sglang_mezo.core.recipe import JobDefaults
from sglang_mezo.jobs.journal import Journal
from sglang_mezo.jobs.runner import JobObserver, JobRunner
from sglang_mezo.options import MezoServerOptions

from . import errors
from .adapter_starts import AdapterStarts
from .context import MezoContext
from .files import FileAccess
from .fine_tuning import routes as fine_tuning_routes
from .fine_tuning.files import FileStore
from .fine_tuning.service import FineTuning
from .fine_tuning.translate import FileTranslator
from .fleet import routes as fleet_routes
from .fleet.follower import FollowerGuard, keep_joined, own_url
from .fleet.leader import FleetLeader
from .fleet.records import History, Join
from .fleet.relay import Relay
from .fleet.role import FleetRole
from .limits import BodyLimit
from .routes import ROUTERS
from .sglang_adapters import TokenizerManagerExecutor, TokenizerManagerScorer
from .translate import LoraLaunch, Translator

logger = logging.getLogger(__name__)


def install(app: FastAPI, context: MezoContext) -> None:
    """The routes, the error handler, the body limit and ``context`` on ``app`` (any FastAPI app: SGLang's, or a
    test's), before it serves."""
    context.attach(app)
    errors.install(app)
    app.add_middleware(BodyLimit, limit_bytes=int(context.limits.max_body_mb * 2**20))
    # inside SGLang's key middleware, which SGLang adds later and so wraps this one: keys are checked first
    app.add_middleware(fine_tuning_routes.FineTunedModelNames)
    for router in (*ROUTERS, fine_tuning_routes.router, fleet_routes.router):
        # flat, not include_router: SGLang's key middleware (--api-key/--admin-api-key) reads a route's auth level
        # from the endpoint of the route it matches, and FastAPI matches an included router as one lazy route
        # whose scope names no endpoint, so every included route would count as NORMAL
        app.router.routes.extend(router.routes)
    # before SGLang's own /v1/models routes, which list the base model only: the first route that matches answers
    app.router.routes[0:0] = fine_tuning_routes.models_router.routes


def _shapes(base_model: str) -> dict[str, tuple[int, ...]] | None:
    """The checkpoint's tensor shapes (the recipe sizes a job's lr by what it trains); None if they cannot be read."""
    try:
        return tensor_shapes(base_model)
    except (CheckpointError, OSError, ValueError) as exc:
        logger.warning("MeZO: the checkpoint's tensor shapes cannot be read (%s): jobs that leave the step out get "
                       "MeZO's plain step at the paper's lr (one SPSA probe, lr 1e-6)", exc)
        return None


def _square_sums(base_model: str) -> Callable[[Sequence[str]], dict[str, tuple[float, int]]]:
    """(Σ t², elements) of checkpoint tensors, read once each per server (a job scaling its tensors reads what no
    job read before it); a tensor that cannot be read is the job's 400."""
    @functools.cache
    def one(name: str) -> tuple[float, int]:
        return tensor_square_sums(base_model, [name])[name]

    def read(names: Sequence[str]) -> dict[str, tuple[float, int]]:
        try:
            return {name: one(name) for name in names}
        except (CheckpointError, OSError) as exc:
            raise ValueError(f"the checkpoint's tensors cannot be read for tensor_scale: {exc}") from exc

    return read


def _observers(server_args, model_name: str) -> list[JobObserver]:
    if not getattr(server_args, "enable_metrics", False):
        return []
    from .metrics import PrometheusObserver

    return [PrometheusObserver({"model_name": model_name})]


def _fleet_role(server_args, options: MezoServerOptions) -> tuple[FleetRole | None, Relay | None]:
    """This server's part in a fleet, and its client for the other servers (None, None outside a fleet)."""
    fleet = options.fleet
    if fleet is None:
        return None, None
    secret = fleet.secret()
    role = FleetRole(fleet.rank, fleet.size, fleet.leader_url, secret,
                     weight_version=str(server_args.weight_version))
    if fleet.leads and fleet.port != str(server_args.port):
        logger.warning("MeZO fleet: this server leads, but listens on port %s, not the fleet address %s: the others "
                       "will not find it", server_args.port, fleet.address)
    return role, Relay(secret, fleet_bearer(server_args))


def fleet_bearer(server_args) -> str | None:
    """The key this server sends the fleet's others: theirs, since a fleet's servers share SGLang's keys."""
    return getattr(server_args, "admin_api_key", None) or getattr(server_args, "api_key", None)


def mount(app: FastAPI, server_args, tokenizer_manager, options: MezoServerOptions) -> None:
    """Add the /mezo routes to SGLang's FastAPI app (before uvicorn starts), with a job runner that reaches the
    scheduler(s) through ``tokenizer_manager``."""
    base_model = str(server_args.model_path)
    model_name = str(tokenizer_manager.served_model_name)  # what SGLang's own /v1/models calls the served model
    journal, journaled, base_version = None, None, str(server_args.weight_version)
    if options.state_dir:  # the plugin read it at launch and the schedulers replayed it: the jobs come back too
        journal = Journal(options.state_dir)
        journaled = journal.open(os.path.abspath(base_model), base_version)
        base_version = journaled.base_weight_version
    executor = TokenizerManagerExecutor(tokenizer_manager)
    role, relay = _fleet_role(server_args, options)
    leader = None if role is None or not role.leads else FleetLeader(
        executor, relay, host=options.fleet.host, size=role.size,
        tp_size=int(server_args.tp_size or 1))
    if leader is not None:
        role.leader = leader
    runner = JobRunner(leader or executor, TokenizerManagerScorer(tokenizer_manager, versions=executor.adapters),
                       chunk_target_s=options.chunk_ms / 1e3, yield_s=options.yield_ms / 1e3,
                       base_weight_version=base_version, base_model=base_model,
                       observers=_observers(server_args, model_name), max_active=options.limits.max_queued_jobs,
                       journal=journal, journaled=journaled, max_adapter_jobs=options.limits.max_adapter_jobs)
    if leader is not None:
        weights = runner.weights
        leader.attach(lambda: History(tuple(s.trajectory for s in weights.segments), weights.weight_version,
                                      weights.base_weight_version, Path(base_model).name))
    for name in runner.adapter_names():  # the schedulers registered each at launch, from the journal
        executor.adopt(runner.adapter(name).adapter_version)
    hf_config = tokenizer_manager.model_config.hf_config
    # every replica scores its shard of each step (--dp-size): the jobs' configs record how many shared it
    defaults = JobDefaults(base=MezoConfig(z_kind=options.resolved_z_kind(str(server_args.device)),
                                           shards=int(server_args.dp_size or 1)),
                           flags=options.knobs(), shapes=_shapes(base_model),
                           num_layers=getattr(hf_config, "num_hidden_layers", None),
                           square_sums=_square_sums(base_model),
                           adapters_off=None if role is None else
                           "adapter jobs do not run in a fleet yet (each server's LoRA pool is its own): train the "
                           "served weights, or train the adapter on a server outside the fleet")
    files = FileAccess.of(options.folders, base_model)
    precision = Precision.of(tokenizer_manager.model_config.dtype, options.master)
    if precision.refusal:
        logger.warning("MeZO: training is off: %s", precision.refusal)
    translator = Translator(tokenizer_manager.tokenizer, int(tokenizer_manager.context_len))
    uploads = FileStore(files.data_dirs[0] / "files" if files.data_dirs else None, options.limits.max_stored_files)
    lora = LoraLaunch.of(server_args, hf_config)
    starts = AdapterStarts(runner, executor.loaded_folder)
    service = FineTuning(runner, uploads, FileTranslator(translator), defaults, options.limits,
                         model_name, lora, starts)
    install(app, MezoContext(runner=runner, translator=translator, defaults=defaults, limits=options.limits,
                             files=files, base_model=base_model, precision=precision, openai_files=uploads,
                             fine_tuning=service, lora=lora, starts=starts, fleet=role))
    if role is not None and not role.leads:
        app.add_middleware(FollowerGuard, role=role)
        keep_joined(relay, role, Join(role.rank, own_url(str(server_args.host), int(server_args.port), role.leader_url),
                                      int(server_args.dp_size or 1), int(server_args.tp_size or 1), role.weight_version,
                                      instance=uuid.uuid4().hex[:12]))
    logger.info("MeZO routes mounted under /mezo and /v1/fine_tuning; data files from %s; checkpoints to %s",
                ", ".join(map(str, files.data_dirs)) or "nowhere (--mezo-data-dir)",
                files.output_dir or "nowhere (--mezo-output-dir)")
