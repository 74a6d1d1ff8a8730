"""From a validated request to the jobs layer's records: text examples (inline or from a data file through a
template), tokenized with the served tokenizer, the objective they imply and the job's hyper-parameters.

Every problem is the request's: an :class:`~sglang_mezo.jobs.errors.InvalidRequest` (400) that names what is
wrong and where, never the content of a server file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.lora import MODULES, LoraSpec, ModelDims
from sglang_mezo.core.objectives import ChoiceExample, CompletionExample, Example, Objective
from sglang_mezo.core.probes import copies_needed
from sglang_mezo.core.recipe import JobDefaults, Knobs, RecipeChoice
from sglang_mezo.jobs.data import DataError, examples_from_records, load_records
from sglang_mezo.jobs.errors import InvalidRequest
from sglang_mezo.jobs.templates import (
    ClassificationTemplate,
    GenerationTemplate,
    MultipleChoiceTemplate,
    TemplateError,
    TextChoice,
    TextExample,
)
from sglang_mezo.options import Limits
from sglang_mezo.protocol import AdapterTarget
from sglang_mezo.scheduler.lora_pool import loadable_refusal

from .schemas import AdapterShapeIn, DatasetIn, ExampleIn, StepRequest

_TEMPLATES = {"classification": ClassificationTemplate, "multiple_choice": MultipleChoiceTemplate,
              "generation": GenerationTemplate}


def objective_for(examples: Sequence[TextExample], requested: Objective | None) -> Objective:
    """The requested objective, or the default for the kind of examples; refused if they do not fit."""
    if requested is Objective.DPO:  # /mezo examples have no preference pairs (OpenAI's format has: method "dpo")
        raise InvalidRequest("objective dpo takes preference pairs, which /mezo examples cannot hold: send them as "
                             "a preference file to POST /v1/fine_tuning/jobs with method type dpo")
    choice = isinstance(examples[0], TextChoice)
    objective = requested or (Objective.CLASSIFICATION if choice else Objective.CROSS_ENTROPY)
    if choice == (objective is Objective.CROSS_ENTROPY):
        raise InvalidRequest(f"objective {objective.value} does not fit "
                             f"{'prompt/options/label' if choice else 'prompt/completion'} examples")
    return objective


def job_config(defaults: JobDefaults, request: StepRequest, limits: Limits) -> tuple[MezoConfig, RecipeChoice]:
    """The request's knobs, else the server's ``--mezo-*`` flags, else the recipe (``config`` re-validates), within
    the server's limits on steps and probes; and where each knob came from."""
    if request.steps > limits.max_steps_per_job:
        raise InvalidRequest(f"steps={request.steps} is more than this server allows per job "
                             f"({Limits.flag('max_steps_per_job')} {limits.max_steps_per_job})")
    try:
        config, choice = defaults.resolve(
            Knobs(**request.model_dump(include={"lr", "eps", "n_probes", "estimator", "adaptive", "schedule"}),
                  selection=request.selection),
            adapter=request.adapter is not None,
            **request.model_dump(include={"tensor_scale", "z_rank"}, exclude_none=True),
            **request.model_dump(include={"z_kind"}, exclude_none=True),
            **request.model_dump(include={"weight_decay", "warmup_steps", "seed"}),
            total_steps=request.steps,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    if config.n_probes > limits.max_probes:
        raise InvalidRequest(f"n_probes={config.n_probes} is more than this server allows "
                             f"({Limits.flag('max_probes')} {limits.max_probes})")
    return config, choice


@dataclass(frozen=True)
class LoraLaunch:
    """The LoRA flags SGLang was launched with, as adapter jobs need them."""

    enabled: bool = False
    max_rank: int | None = None
    target_modules: tuple[str, ...] = ()
    """Empty: SGLang infers them from --lora-paths (then only the scheduler can check a job's)."""
    max_loras_per_batch: int = 8
    tp_size: int = 1
    dims: ModelDims | None = None
    """The served model's sizes (an adapter's tensor shapes)."""

    @classmethod
    def of(cls, server_args, hf_config=None) -> LoraLaunch:
        modules = tuple(getattr(server_args, "lora_target_modules", None) or ())
        if "all" in modules:
            modules = MODULES
        return cls(enabled=bool(getattr(server_args, "enable_lora", False)),
                   max_rank=getattr(server_args, "max_lora_rank", None), target_modules=modules,
                   max_loras_per_batch=int(getattr(server_args, "max_loras_per_batch", 8) or 8),
                   tp_size=int(getattr(server_args, "tp_size", 1) or 1),
                   dims=None if hf_config is None else ModelDims.of(hf_config))


def adapter_target(name: str, request: AdapterShapeIn, launch: LoraLaunch, config: MezoConfig,
                   start: LoraSpec | None = None) -> AdapterTarget:
    """The adapter ``name`` a job trains, its unset fields from ``start``'s (the spec of an adapter that starts from
    ``request.start_from``: :meth:`~.adapter_starts.AdapterStarts.resolve`) or else the launch flags; a 400 naming the flag it goes beyond, or the field that
    differs from its start."""
    if not launch.enabled:
        raise InvalidRequest("adapter jobs train in SGLang's LoRA pool: start the server with --enable-lora "
                             "(and --max-lora-rank, --lora-target-modules)")
    if launch.tp_size != 1:
        raise InvalidRequest(f"adapter jobs train at tensor-parallel size 1 only; this server runs --tp-size "
                             f"{launch.tp_size}")
    if start is not None:
        request = _shaped_as(request, start)
    rank = request.rank or launch.max_rank
    if rank is None:
        raise InvalidRequest("adapter.rank is required: this server sets no --max-lora-rank")
    if launch.max_rank is not None and rank > launch.max_rank:
        raise InvalidRequest(f"adapter.rank={rank} is more than the LoRA pool holds (--max-lora-rank "
                             f"{launch.max_rank})")
    modules = tuple(request.target_modules or launch.target_modules)
    if not modules:
        raise InvalidRequest("adapter.target_modules is required: this server sets no --lora-target-modules")
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        raise InvalidRequest(f"adapter.target_modules {unknown} are not among {', '.join(MODULES)}")
    beyond = sorted(set(modules) - set(launch.target_modules)) if launch.target_modules else []
    if beyond:
        raise InvalidRequest(f"adapter.target_modules {beyond} are not in this server's LoRA pool "
                             f"(--lora-target-modules {' '.join(launch.target_modules)})")
    spec = LoraSpec(rank=rank, alpha=request.alpha or 2.0 * rank, target_modules=modules, init_seed=config.seed,
                    start=None if start is None else start.start)
    refusal = loadable_refusal(spec)
    if refusal:
        raise InvalidRequest(f"adapter.target_modules: {refusal}")
    needed = copies_needed(config)
    if needed > launch.max_loras_per_batch - 1:  # the base (or another adapter) keeps a slot
        raise InvalidRequest(f"a step scores its {needed} probes ({config.estimator.value}, n_probes="
                             f"{config.n_probes}) as adapters in one batch: more than the LoRA pool's slots allow "
                             f"(--max-loras-per-batch {launch.max_loras_per_batch}, one kept for other traffic)")
    return AdapterTarget(name, spec, probes_in_one_batch=request.probes_in_one_batch)


def _shaped_as(request: AdapterShapeIn, start: LoraSpec) -> AdapterShapeIn:
    """``request`` with the shape of the adapter it starts from; a 400 where it names another (an adapter's tensors
    keep their shapes and meaning: a different rank, alpha or module set would be another function)."""
    asked = {"rank": request.rank, "alpha": request.alpha,
             "target_modules": None if request.target_modules is None else sorted(request.target_modules)}
    own = {"rank": start.rank, "alpha": start.alpha, "target_modules": sorted(start.target_modules)}
    for field, value in asked.items():
        if value is not None and value != own[field]:
            raise InvalidRequest(f"adapter.{field}={value} differs from that of the adapter it starts from "
                                 f"({request.start_from!r}: {start.shape_text()}); leave it out")
    return request.model_copy(update={"rank": start.rank, "alpha": start.alpha,
                                      "target_modules": list(start.target_modules)})


def check_count(limits: Limits, n: int) -> None:
    """Before tokenizing: no more examples than a job may have."""
    if n > limits.max_examples_per_job:
        raise InvalidRequest(f"{n} examples are more than this server allows per job "
                             f"({Limits.flag('max_examples_per_job')} {limits.max_examples_per_job})")


def check_tokens(limits: Limits, *example_sets: Sequence[Example]) -> None:
    """After tokenizing: no more tokens than a job may have (prompts, completions and every option)."""
    tokens = sum(e.tokens for examples in example_sets for e in examples)
    if tokens > limits.max_tokens_per_job:
        raise InvalidRequest(f"the examples hold {tokens} tokens, more than this server allows per job "
                             f"({Limits.flag('max_tokens_per_job')} {limits.max_tokens_per_job})")


def texts(examples: Sequence[ExampleIn]) -> list[TextExample]:
    return [e.to_text() for e in examples]


def dataset_texts(spec: DatasetIn, path: Path,
                  for_training: bool = True) -> tuple[list[TextExample], list[TextExample]]:
    """Training and held-out examples from the data file ``path`` (the request's ``spec.path``, resolved inside an
    allowed folder; blocking: run it in a thread). For an evaluation (``for_training`` False) every record may be
    held out, and with no held-out set the "training" part is every record (``train_size`` does not apply)."""
    fields = spec.template.model_dump(exclude={"kind"})
    template = _TEMPLATES[spec.template.kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    try:
        records = load_records(path, spec.format, spec.split)
        return examples_from_records(records, template, eval_size=spec.eval_size,
                                     train_size=spec.train_size if for_training else None, seed=spec.seed,
                                     require_train=for_training)
    except (DataError, TemplateError) as exc:  # their messages name the file, line and field, never content
        raise InvalidRequest(f"dataset {spec.path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - anything else a reader says may quote the file: say only what failed
        raise InvalidRequest(f"dataset {spec.path}: cannot be read ({type(exc).__name__})") from None


class Translator:
    """Tokenizes text examples as the server's tokenizer does for user requests."""

    def __init__(self, tokenizer, context_len: int) -> None:
        self.tokenizer = tokenizer
        self.context_len = context_len

    def _ids(self, text: str, special: bool) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def prompt_ids(self, prompt: str, chat: bool) -> tuple[int, ...]:
        if not chat:
            return self._ids(prompt, True)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("chat: the served model's tokenizer has no chat template")
        # the template writes its own special tokens; the answer (an option, a completion) follows its assistant
        # turn start, as a chat reply would
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        return self._ids(text, False)

    def tokenize(self, examples: Sequence[TextExample], what: str = "example", *,
                 chat: bool = False) -> tuple[Example, ...]:
        """Token ids of each example (blocking for long lists: run it in a thread). The prompt gets the
        tokenizer's special tokens, as a user's prompt does (with ``chat``, it is the user's turn of the chat
        template instead); completions and options do not."""
        out: list[Example] = []
        for i, example in enumerate(examples):
            prompt = self.prompt_ids(example.prompt, chat)
            if isinstance(example, TextChoice):
                options = tuple(self._ids(o, False) for o in example.options)
                tokenized: Example = ChoiceExample(prompt, options, example.label)
                longest = max(map(len, options))
            else:
                completion = self._ids(example.completion, False)
                tokenized = CompletionExample(prompt, completion)
                longest = len(completion)
            if len(prompt) + longest >= self.context_len:  # SGLang refuses an input that fills the whole context
                raise InvalidRequest(f"{what} {i} has {len(prompt) + longest} tokens; it must be shorter than the "
                                     f"model's context length, {self.context_len}")
            out.append(tokenized)
        return tuple(out)
