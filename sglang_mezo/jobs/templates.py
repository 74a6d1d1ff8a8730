"""Prompt templates: from a data record (a dict of fields) to a training example in text.

* :class:`ClassificationTemplate`: MeZO's prompt-based classification. ``"{text} It was"`` is scored against a
  verbalizer (``" terrible"`` / ``" great"``): a choice example whose label is the record's class.
* :class:`MultipleChoiceTemplate`: a question and the record's own list of choices.
* :class:`GenerationTemplate`: a prompt and a completion, both formatted from the record (free generation).

Templates are ``str.format`` strings over the record's fields, so they are also the field mapping: a user-defined
template is one with other strings. The label of a record is found with :meth:`label_of`.

A record comes from a file on the server: errors name the field the template expected and never quote the record
(its values, or the names of its other fields), so that no message carries a file's content.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class TemplateError(ValueError):
    """A record does not fit the template (a missing field, a label with no option)."""


@dataclass(frozen=True)
class TextCompletion:
    """Learn ``completion`` after ``prompt`` (text, before tokenization)."""

    prompt: str
    completion: str

    def __post_init__(self) -> None:
        if not self.prompt or not self.completion:
            raise TemplateError("a prompt and its completion must be non-empty text")


@dataclass(frozen=True)
class TextChoice:
    """Pick option ``label`` among ``options`` after ``prompt`` (text, before tokenization)."""

    prompt: str
    options: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        if not self.prompt or len(self.options) < 2 or not all(self.options):
            raise TemplateError("a choice needs a non-empty prompt and at least two non-empty options")
        if not 0 <= self.label < len(self.options):
            raise TemplateError(f"the label is not an index of the {len(self.options)} options")


TextExample = TextCompletion | TextChoice


def _fields(fmt: str, what: str) -> set[str]:
    """The field names of a template. Only plain ``{name}`` fields are allowed: no attribute or index access, no
    conversion, no format spec (a template comes from a request and must not reach into objects or pad)."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        raise TemplateError(f"{what} is not a valid template: {exc}") from None
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise TemplateError(f"{what}: only plain {{field}} placeholders are allowed, not {{{name}...}}")
        names.add(name)
    return names


def _format(fmt: str, record: Mapping, what: str) -> str:
    missing = _fields(fmt, what) - set(record)
    if missing:
        raise TemplateError(f"{what} needs field(s) {sorted(missing)}, which the record does not have")
    return fmt.format_map({name: record[name] for name in _fields(fmt, what)})


def _label_index(value, labels: Sequence[str] | None, n: int, field: str) -> int:
    if labels is not None:
        try:
            return [str(v) for v in labels].index(str(value))
        except ValueError:
            raise TemplateError(f"field {field!r} is not one of the labels {list(labels)}") from None
    try:
        index = int(value)
    except (TypeError, ValueError, OverflowError):  # (OverflowError: int(float("inf")), which JSON can hold)
        raise TemplateError(f"field {field!r} is not a class index; give the template its labels") from None
    if not 0 <= index < n:
        raise TemplateError(f"field {field!r} is not an index of the {n} options")
    return index


@dataclass(frozen=True)
class ClassificationTemplate:
    prompt: str = "{text} It was"
    verbalizer: tuple[str, ...] = (" terrible", " great")
    """One option per class, in class order."""
    label_field: str = "label"
    labels: tuple[str, ...] | None = None
    """The values of ``label_field`` in class order (default: the field holds the class index)."""

    def label_of(self, record: Mapping) -> int:
        if self.label_field not in record:
            raise TemplateError(f"the record has no label field {self.label_field!r}")
        return _label_index(record[self.label_field], self.labels, len(self.verbalizer), self.label_field)

    def example(self, record: Mapping) -> TextChoice:
        return TextChoice(_format(self.prompt, record, "the prompt"), tuple(self.verbalizer), self.label_of(record))


@dataclass(frozen=True)
class MultipleChoiceTemplate:
    prompt: str = "{question}\nAnswer:"
    choices_field: str = "choices"
    option: str = " {choice}"
    """How each choice is written after the prompt."""
    label_field: str = "answer"
    labels: tuple[str, ...] | None = None
    """If the label is not an index: the label values naming choices 0, 1, … (e.g. ``("A", "B", "C", "D")``)."""

    def _choices(self, record: Mapping) -> list:
        choices = record.get(self.choices_field)
        if not isinstance(choices, Sequence) or isinstance(choices, str) or len(choices) < 2:
            raise TemplateError(f"field {self.choices_field!r} must be a list of at least two choices")
        return list(choices)

    def label_of(self, record: Mapping) -> int:
        if self.label_field not in record:
            raise TemplateError(f"the record has no label field {self.label_field!r}")
        return _label_index(record[self.label_field], self.labels, len(self._choices(record)), self.label_field)

    def example(self, record: Mapping) -> TextChoice:
        if _fields(self.option, "the option") - {"choice"}:
            raise TemplateError("the option template may only use {choice}")
        return TextChoice(_format(self.prompt, record, "the prompt"),
                          tuple(_format(self.option, {"choice": c}, "the option") for c in self._choices(record)),
                          self.label_of(record))


@dataclass(frozen=True)
class GenerationTemplate:
    prompt: str = "{input}"
    completion: str = " {output}"

    def label_of(self, record: Mapping) -> None:
        return None  # no classes: splits are plain random draws

    def example(self, record: Mapping) -> TextCompletion:
        return TextCompletion(_format(self.prompt, record, "the prompt"),
                              _format(self.completion, record, "the completion"))


Template = ClassificationTemplate | MultipleChoiceTemplate | GenerationTemplate
