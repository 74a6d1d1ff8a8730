"""Training files in OpenAI's fine-tuning formats: each JSON line validated into a typed record, and a whole file
into one kind of records, with errors that name the line.

The three formats OpenAI's fine-tuning API takes (https://platform.openai.com/docs/guides/fine-tuning):

* **chat**, ``{"messages": [{"role": "system" | "user" | "assistant", "content": "...", "weight": 0 | 1}, ...]}``:
  the loss is on the assistant turns only, each one after the conversation before it as the model's chat template
  writes it; an assistant turn with ``"weight": 0`` is context, not a target (OpenAI's rule: ``weight`` is only
  for assistant messages).
* **prompt/completion** (OpenAI's legacy format), ``{"prompt": "...", "completion": "..."}``: the completion after
  the prompt, as plain text.
* **preference** (OpenAI's DPO format), ``{"input": {"messages": [...]}, "preferred_output": [{"role":
  "assistant", "content": "..."}], "non_preferred_output": [...]}``: two answers to one conversation.

A file is one kind: mixing them is an error at the first line of another kind. The checks are pydantic's (a
well-kept validator whose error locations name the field); messages here carry the line, the field and what was
expected, never the line's text. Tools, function calls and images are not taken (MeZO scores text).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .data import DataError
from .templates import TextCompletion


class LineKind(str, enum.Enum):
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    PREFERENCE = "preference"


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    trained: bool = False
    """An assistant turn the loss is on (a weight of 1, OpenAI's default); always False for other roles."""


@dataclass(frozen=True)
class ChatLine:
    messages: tuple[Message, ...]

    @property
    def targets(self) -> tuple[int, ...]:
        """The indices of the messages the loss is on."""
        return tuple(i for i, m in enumerate(self.messages) if m.trained)


@dataclass(frozen=True)
class PreferenceLine:
    messages: tuple[Message, ...]
    """The conversation both answers follow (trained is False throughout: the loss is on the answers)."""
    preferred: str
    non_preferred: str


Line = ChatLine | TextCompletion | PreferenceLine
"""A prompt/completion line is the text example the ``/mezo`` API's own examples make (:class:`TextCompletion`)."""


# -- the wire shapes (pydantic), one per format ------------------------------------------------------------------------


class _Strict(BaseModel):
    # unknown keys are refused rather than silently ignored: a misspelt "weight" must not train on a turn
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _MessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(min_length=1)
    weight: Literal[0, 1] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _weight_on_assistant_only(self) -> _MessageIn:
        if self.weight is not None and self.role != "assistant":
            raise ValueError("weight is only for assistant messages")
        return self

    def to_message(self, trainable: bool) -> Message:
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for the same turn
        return Message(role, self.content, trainable and self.role == "assistant" and self.weight != 0)


class _ChatIn(_Strict):
    messages: list[_MessageIn] = Field(min_length=1)

    def to_line(self) -> ChatLine:
        line = ChatLine(tuple(m.to_message(trainable=True) for m in self.messages))
        if not line.targets:
            raise ValueError("messages: no assistant message to train on (each has weight 0, or there is none)")
        return line


class _PromptCompletionIn(_Strict):
    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)

    def to_line(self) -> TextCompletion:
        return TextCompletion(self.prompt, self.completion)


class _AnswerIn(_Strict):
    role: Literal["assistant"]
    content: str = Field(min_length=1)


class _InputIn(BaseModel):
    # OpenAI's input may also hold tools and parallel_tool_calls; they are refused by name below
    model_config = ConfigDict(extra="allow")
    messages: list[_MessageIn] = Field(min_length=1)


class _PreferenceIn(_Strict):
    input: _InputIn
    preferred_output: list[_AnswerIn] = Field(min_length=1, max_length=1)
    non_preferred_output: list[_AnswerIn] = Field(min_length=1, max_length=1)

    def to_line(self) -> PreferenceLine:
        if self.input.model_extra:
            raise ValueError(f"input: {', '.join(sorted(self.input.model_extra))} not supported (text messages only)")
        return PreferenceLine(tuple(m.to_message(trainable=False) for m in self.input.messages),
                              self.preferred_output[0].content, self.non_preferred_output[0].content)


_SHAPES: dict[LineKind, type[_ChatIn | _PromptCompletionIn | _PreferenceIn]] = {
    LineKind.CHAT: _ChatIn, LineKind.PROMPT_COMPLETION: _PromptCompletionIn, LineKind.PREFERENCE: _PreferenceIn}


def kind_of(record: dict) -> LineKind:
    """Which format a record is, by its keys."""
    if "messages" in record:
        return LineKind.CHAT
    if "preferred_output" in record or "non_preferred_output" in record or "input" in record:
        return LineKind.PREFERENCE
    if "prompt" in record or "completion" in record:
        return LineKind.PROMPT_COMPLETION
    raise ValueError('expected "messages" (chat), "prompt" and "completion", or "input", "preferred_output" and '
                     '"non_preferred_output" (preference)')


def _explain(exc: ValidationError) -> str:
    """pydantic's errors as "field: what was expected", without the offending values."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts[:3]) + (f" (and {len(parts) - 3} more)" if len(parts) > 3 else "")


def parse_line(record: object, kind: LineKind | None = None) -> Line:
    """One record as a typed line; ``kind`` (the file's, from its first line) if it must be that kind."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    found = kind_of(record)
    if kind is not None and found is not kind:
        raise ValueError(f"a {found.value} line in a {kind.value} file (a file holds one format)")
    try:
        return _SHAPES[found].model_validate(record).to_line()
    except ValidationError as exc:
        raise ValueError(_explain(exc)) from None


@dataclass(frozen=True)
class TrainingFile:
    """The lines of a training file, all of one kind."""

    kind: LineKind
    lines: tuple[Line, ...]
    numbers: tuple[int, ...]
    """The line of the file each line came from (1-based; blank lines are skipped)."""


def parse_jsonl(name: str, text_lines: Iterable[str], max_errors: int = 5) -> TrainingFile:
    """Every line of a JSONL training file (blank lines skipped). Raises :class:`DataError` naming up to
    ``max_errors`` bad lines by number, so a user fixes a file in one round rather than one line at a time."""
    lines: list[Line] = []
    numbers: list[int] = []
    errors: list[str] = []
    kind: LineKind | None = None
    for number, text in enumerate(text_lines, start=1):
        if not text.strip():
            continue
        try:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON ({exc.msg}, column {exc.colno})") from None
            line = parse_line(record, kind)
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
            if len(errors) >= max_errors:
                break
            continue
        kind = kind or kind_of(record)
        lines.append(line)
        numbers.append(number)
    if errors:
        raise DataError(f"{name}: " + "; ".join(errors))
    if kind is None:
        raise DataError(f"{name} holds no examples")
    return TrainingFile(kind, tuple(lines), tuple(numbers))
