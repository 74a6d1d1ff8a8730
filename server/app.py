"""Putting the ``/mezo/*`` API on a FastAPI app: the job runner over SGLang's tokenizer manager, the routes, the
error handler, and the context the routes depend on."""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.master import Precision
from sglang_mezo.jobs.journal import Journal
from sglang_mezo.jobs.runner import JobObserver, JobRunner
from sglang_mezo.options import MezoServerOptions

from . import errors
from .context import MezoContext
from .files import FileAccess
from .limits import BodyLimit
from .routes import ROUTERS
from .sglang_adapters import TokenizerManagerExecutor, TokenizerManagerScorer
from .translate import Translator

logger = logging.getLogger(__name__)


def install(app: FastAPI, context: MezoContext) -> None:
    """The routes, the error handler, the body limit and ``context`` on ``app`` (any FastAPI app: SGLang's, or a
    test's), before it serves."""
    context.attach(app)
    errors.install(app)
    app.add_middleware(BodyLimit, limit_bytes=int(context.limits.max_body_mb * 2**20))
    for router in ROUTERS:
        # flat, not include_router: SGLang's key middleware (--api-key/--admin-api-key) reads a route's auth level
        # from the endpoint of the route it matches, and FastAPI matches an included router as one lazy route
        # whose scope names no endpoint, so every included route would count as NORMAL
        app.router.routes.extend(router.routes)


def _observers(server_args) -> list[JobObserver]:
    if not getattr(server_args, "enable_metrics", False):
        return []
    from .metrics import PrometheusObserver

    return [PrometheusObserver({"model_name": str(server_args.served_model_name)})]


def mount(app: FastAPI, server_args, tokenizer_manager, options: MezoServerOptions) -> None:
    """Add the /mezo routes to SGLang's FastAPI app (before uvicorn starts), with a job runner that reaches the
    scheduler(s) through ``tokenizer_manager``."""
    base_model = str(server_args.model_path)
    journal, journaled, base_version = None, None, str(server_args.weight_version)
    if options.state_dir:  # the plugin read it at launch and the schedulers replayed it: the jobs come back too
        journal = Journal(options.state_dir)
        journaled = journal.open(os.path.abspath(base_model), base_version)
        base_version = journaled.base_weight_version
    runner = JobRunner(TokenizerManagerExecutor(tokenizer_manager), TokenizerManagerScorer(tokenizer_manager),
                       chunk_target_s=options.chunk_ms / 1e3, yield_s=options.yield_ms / 1e3,
                       base_weight_version=base_version, base_model=base_model, observers=_observers(server_args),
                       max_active=options.limits.max_queued_jobs, journal=journal, journaled=journaled)
    defaults = MezoConfig(lr=options.lr, eps=options.eps, n_probes=options.n_probes,
                          z_kind=options.resolved_z_kind(str(server_args.device)), estimator=options.estimator,
                          adaptive=options.adaptive, selection=options.selection)
    files = FileAccess.of(options.folders, base_model)
    precision = Precision.of(tokenizer_manager.model_config.dtype, options.master)
    if precision.refusal:
        logger.warning("MeZO: training is off: %s", precision.refusal)
    install(app, MezoContext(runner=runner, translator=Translator(tokenizer_manager.tokenizer,
                                                                  int(tokenizer_manager.context_len)),
                             defaults=defaults, limits=options.limits, files=files, base_model=base_model,
                             precision=precision))
    logger.info("MeZO routes mounted under /mezo; data files from %s; checkpoints to %s",
                ", ".join(map(str, files.data_dirs)) or "nowhere (--mezo-data-dir)",
                files.output_dir or "nowhere (--mezo-output-dir)")
