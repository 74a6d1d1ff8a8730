"""From a parsed OpenAI training file to the jobs layer's token examples, written as the served model reads them.

* chat: one completion example per trained assistant turn. The prompt is the conversation before the turn through
  the model's own chat template, ending with the assistant turn's start (``add_generation_prompt``); the
  completion is what the template writes for the turn itself, its end-of-turn tokens included, so the model also
  learns to stop. Only those tokens carry loss: the context turns are the prompt's.
* prompt/completion: the completion after the prompt, as plain text (the prompt gets the tokenizer's special
  tokens, as a user's ``/v1/completions`` prompt does).
* preference: the conversation as the prompt, each answer written as an assistant turn, for the ``dpo``
  objective.
"""

from __future__ import annotations

from collections.abc import Sequence

from jinja2 import TemplateError

from sglang_mezo.core.objectives import CompletionExample, Example, PreferenceExample
from sglang_mezo.jobs.data import DataError
from sglang_mezo.jobs.openai_data import ChatLine, LineKind, Message, PreferenceLine, TrainingFile
from sglang_mezo.jobs.templates import TextCompletion

from ..translate import Translator


class FileTranslator:
    """Renders and tokenizes OpenAI lines with the served tokenizer and chat template."""

    def __init__(self, translator: Translator) -> None:
        self.translator = translator

    @property
    def tokenizer(self):
        return self.translator.tokenizer

    def _render(self, messages: Sequence[Message], *, reply_next: bool) -> str:
        return self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                  tokenize=False, add_generation_prompt=reply_next)

    def _turn(self, before: Sequence[Message], reply: Message) -> tuple[str, str]:
        """(the prompt up to the reply's start, the reply as the template writes it)."""
        prompt = self._render(before, reply_next=True)
        full = self._render([*before, reply], reply_next=False)
        if not full.startswith(prompt) or len(full) == len(prompt):
            # a template that rewrites earlier turns when one is added (some drop past reasoning): the turn has
            # no well-defined tokens of its own
            raise ValueError("the model's chat template does not write this assistant turn after the conversation "
                             "before it")
        return prompt, full[len(prompt):]

    def _ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _chat(self, line: ChatLine) -> list[Example]:
        out: list[Example] = []
        for target in line.targets:
            prompt, reply = self._turn(line.messages[:target], line.messages[target])
            out.append(CompletionExample(self._ids(prompt), self._ids(reply)))
        return out

    def _preference(self, line: PreferenceLine, beta: float) -> Example:
        prompt, chosen = self._turn(line.messages, Message("assistant", line.preferred))
        again, rejected = self._turn(line.messages, Message("assistant", line.non_preferred))
        if again != prompt:
            raise ValueError("the chat template writes the prompt differently before the two answers")
        return PreferenceExample(self._ids(prompt), self._ids(chosen), self._ids(rejected), beta=beta)

    def examples(self, name: str, file: TrainingFile, *, beta: float = 0.1) -> tuple[Example, ...]:
        """Every example of ``file`` (blocking: run it in a thread). Raises :class:`DataError` naming the line of
        the first example the model cannot take (no chat template, longer than its context)."""
        if file.kind is not LineKind.PROMPT_COMPLETION and not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"{name}: {file.kind.value} lines need a chat template, and the served model's "
                            "tokenizer has none")
        out: list[Example] = []
        for number, line in zip(file.numbers, file.lines, strict=True):
            try:
                if isinstance(line, ChatLine):
                    made = self._chat(line)
                elif isinstance(line, PreferenceLine):
                    made = [self._preference(line, beta)]
                else:
                    assert isinstance(line, TextCompletion)
                    made = [CompletionExample(self.translator.prompt_ids(line.prompt, chat=False),
                                              self._ids(line.completion))]
                for example in made:
                    self._check_length(example)
            except (ValueError, TemplateError) as exc:  # a template may refuse a conversation (roles must alternate…)
                raise DataError(f"{name}, line {number}: {exc}") from None
            out.extend(made)
        return tuple(out)

    def _check_length(self, example: Example) -> None:
        answers = ((example.chosen_ids, example.rejected_ids) if isinstance(example, PreferenceExample)
                   else (example.completion_ids,))
        longest = len(example.prompt_ids) + max(map(len, answers))
        if longest >= self.translator.context_len:
            raise ValueError(f"{longest} tokens; it must be shorter than the model's context length, "
                             f"{self.translator.context_len}")
