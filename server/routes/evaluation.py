"""``/mezo/eval`` and ``/mezo/diagnose``: measure the served weights, and whether an objective gives a signal."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from sglang.srt.utils.auth import AuthLevel, auth_level

from sglang_mezo.jobs.diagnose import diagnose as run_diagnosis
from sglang_mezo.jobs.errors import InvalidRequest
from sglang_mezo.options import Limits

from ..context import Context
from ..errors import MezoRoute
from ..schemas import DiagnoseOut, DiagnoseRequest, EvalOut, EvalRequest
from ..translate import check_count, check_tokens, dataset_texts, objective_for, texts

router = APIRouter(prefix="/mezo", tags=["mezo"], route_class=MezoRoute)


@router.post("/eval")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def evaluate(request: EvalRequest, mezo: Context) -> EvalOut:
    """Score examples under the served weights; batched with user traffic, nothing changes. While a job runs, a
    step may commit meanwhile: ``weight_version`` then lists both."""
    examples = texts(request.examples)
    if request.dataset is not None:
        path = mezo.files.data_file(request.dataset.path)
        train, held_out = await asyncio.to_thread(dataset_texts, request.dataset, path, False)
        examples = held_out if request.dataset.eval_size else train
    check_count(mezo.limits, len(examples))
    objective = objective_for(examples, request.objective)
    tokenized = await asyncio.to_thread(mezo.translator.tokenize, examples, chat=request.chat)
    check_tokens(mezo.limits, tokenized)
    metrics, version = await mezo.runner.evaluate(objective, tokenized, request.generate)
    return EvalOut.of(metrics, version)


@router.post("/diagnose")
@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def diagnose(request: DiagnoseRequest, mezo: Context) -> DiagnoseOut:
    """For each ε: ``probes`` probes of the batch with lr = 0 (an ordinary job: it queues behind others, and its
    probes' round trips are recorded, so the served weights stay exactly described)."""
    if mezo.precision.refusal:
        raise InvalidRequest(mezo.precision.refusal)
    if request.probes > mezo.limits.max_steps_per_job:  # each ε is a job of that many steps
        raise InvalidRequest(f"probes={request.probes} is more than this server allows per job "
                             f"({Limits.flag('max_steps_per_job')} {mezo.limits.max_steps_per_job})")
    examples = texts(request.examples)
    check_count(mezo.limits, len(examples))
    objective = objective_for(examples, request.objective)
    tokenized = await asyncio.to_thread(mezo.translator.tokenize, examples, chat=request.chat)
    check_tokens(mezo.limits, tokenized)
    # the config a job that names nothing would train with (its set, its z kind)
    results = await run_diagnosis(mezo.runner, mezo.defaults.resolve()[0], tokenized, objective, eps=request.eps,
                                  probes=request.probes, seed=request.seed, base_model=mezo.base_model)
    return DiagnoseOut(objective=objective, results=results)
