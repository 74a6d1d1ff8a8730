"""What an OpenAI fine-tuning job becomes: its files read, validated and tokenized, its hyper-parameters resolved
(the job's, else the server's flags, else the recipe), as the runner's :class:`~sglang_mezo.jobs.spec.JobSpec`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sglang_mezo.core.lora import LoraSpec
from sglang_mezo.core.objectives import Example, Objective
from sglang_mezo.core.recipe import JobDefaults, Knobs
from sglang_mezo.jobs.data import DataError
from sglang_mezo.jobs.errors import InvalidRequest
from sglang_mezo.jobs.openai_data import LineKind, TrainingFile, parse_jsonl
from sglang_mezo.jobs.spec import JobSpec
from sglang_mezo.options import Limits

from ..schemas import AdapterShapeIn
from ..translate import LoraLaunch, adapter_target, check_count, check_tokens
from .files import FileStore
from .hyperparameters import AUTO_BETA, Resolved, auto, resolve
from .schemas import JobCreate
from .translate import FileTranslator


class FileError(InvalidRequest):
    """A training or validation file that does not validate; ``param`` names which."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def ft_method(kinds: Sequence[LineKind]) -> str:
    return "dpo" if LineKind.PREFERENCE in kinds else "supervised"


class SpecBuilder:
    """Turns fine-tuning requests into runner jobs, with this server's files, tokenizer, defaults and limits."""

    def __init__(self, store: FileStore, translator: FileTranslator, defaults: JobDefaults, limits: Limits,
                 lora: LoraLaunch, base_model: str) -> None:
        self.store = store
        self.translator = translator
        self.defaults = defaults
        self.limits = limits
        self.lora = lora
        self.base_model = base_model

    def _read(self, file_id: str, param: str, kinds: Sequence[LineKind]) -> TrainingFile:
        stored = self.store.get(file_id)
        try:
            with self.store.path(file_id).open(encoding="utf-8") as f:
                parsed = parse_jsonl(stored.filename, f)
        except UnicodeDecodeError:
            raise FileError(f"{stored.filename}: not UTF-8 text", param) from None
        except OSError:  # deleted meanwhile, or unreadable: the error's text would name the server's folder
            raise FileError(f"{stored.filename} ({file_id}) could not be read", param) from None
        except DataError as exc:
            raise FileError(str(exc), param) from None
        if parsed.kind not in kinds:
            raise FileError(f"{stored.filename} holds {parsed.kind.value} lines; a {ft_method(kinds)} job takes "
                             f"{' or '.join(k.value for k in kinds)} lines", param)
        return parsed

    def _examples(self, file_id: str, param: str, kinds: Sequence[LineKind], beta: float) -> tuple[Example, ...]:
        parsed = self._read(file_id, param, kinds)
        try:
            return self.translator.examples(self.store.get(file_id).filename, parsed, beta=beta)
        except DataError as exc:
            raise FileError(str(exc), param) from None

    def build(self, request: JobCreate, adapter_name: str, section: AdapterShapeIn | None,
              start: LoraSpec | None) -> tuple[JobSpec, Resolved]:
        """The runner's job for ``request`` and its resolved hyper-parameters (blocking: files are read and
        tokenized), training the adapter ``section`` (served as ``adapter_name``) from ``start`` if it has one."""
        dpo = request.method_type == "dpo"
        kinds = (LineKind.PREFERENCE,) if dpo else (LineKind.CHAT, LineKind.PROMPT_COMPLETION)
        beta = auto(getattr(request.given_hyperparameters(), "beta", None), AUTO_BETA)
        train = self._examples(request.training_file, "training_file", kinds, beta)
        held_out = (self._examples(request.validation_file, "validation_file", kinds, beta)
                    if request.validation_file else ())
        check_count(self.limits, len(train) + len(held_out))
        check_tokens(self.limits, train, held_out)
        resolved = resolve(request, len(train), self.limits)
        mezo = request.mezo
        knobs = Knobs(**mezo.model_dump(include={"eps", "n_probes", "estimator", "adaptive", "schedule"}),
                      selection=mezo.selection) if mezo else Knobs()  # the job's own subset, else the server's
        try:
            config, recipe = self.defaults.resolve(
                knobs, adapter=section is not None, total_steps=resolved.steps,
                **(mezo.model_dump(include={"tensor_scale", "z_rank"}, exclude_none=True) if mezo else {}),
                **({"z_kind": mezo.z_kind} if mezo and mezo.z_kind else {}),
                **({"seed": request.seed} if request.seed is not None else {}))
            # OpenAI's multiplier scales the lr the flags or the recipe chose
            config = dataclasses.replace(config, lr=config.lr * resolved.lr_multiplier)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        if config.n_probes > self.limits.max_probes:
            raise InvalidRequest(f"n_probes={config.n_probes} is more than this server allows "
                                 f"({Limits.flag('max_probes')} {self.limits.max_probes})")
        eval_every = (request.mezo.eval_every if request.mezo and request.mezo.eval_every
                      else max(1, resolved.steps // 4)) if held_out else 0
        adapter = None if section is None else adapter_target(adapter_name, section, self.lora, config, start)
        return JobSpec(examples=train, objective=Objective.DPO if dpo else Objective.CROSS_ENTROPY, config=config,
                       batch_size=resolved.batch_size, base_model=self.base_model, eval_examples=held_out,
                       eval_every=eval_every, adapter=adapter, recipe=recipe), resolved
