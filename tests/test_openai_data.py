"""Training files in OpenAI's formats (``sglang_mezo.jobs.openai_data``): each format parsed into its typed lines,
the assistant turns the loss is on, and every kind of bad line named by its number without quoting it."""

from __future__ import annotations

import json

import pytest

from sglang_mezo.jobs.data import DataError
from sglang_mezo.jobs.openai_data import ChatLine, LineKind, Message, PreferenceLine, parse_jsonl
from sglang_mezo.jobs.templates import TextCompletion


def jsonl(*records) -> list[str]:
    return [json.dumps(r) + "\n" for r in records]


def test_chat_lines_train_on_assistant_turns_with_weight_1():
    file = parse_jsonl("chat.jsonl", jsonl(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello.", "weight": 0}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Goodbye."}]},
        {"messages": [{"role": "developer", "content": "Terse."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4", "weight": 1}]}))
    assert file.kind is LineKind.CHAT
    first, second = file.lines
    assert isinstance(first, ChatLine) and first.targets == (4,)  # the weight-0 turn is context only
    assert first.messages[2] == Message("assistant", "Hello.", trained=False)
    assert second.messages[0].role == "system" and second.targets == (2,)  # developer is the system turn


def test_prompt_completion_and_preference_lines():
    pc = parse_jsonl("pc.jsonl", jsonl({"prompt": "Q: 1+1?", "completion": " 2"}))
    assert pc.kind is LineKind.PROMPT_COMPLETION and pc.lines == (TextCompletion("Q: 1+1?", " 2"),)
    pref = parse_jsonl("dpo.jsonl", jsonl({
        "input": {"messages": [{"role": "user", "content": "Say hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hi!"}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}]}))
    assert pref.kind is LineKind.PREFERENCE
    assert pref.lines == (PreferenceLine((Message("user", "Say hi"),), "Hi!", "No."),)


@pytest.mark.parametrize("record, expected", [
    ("not json", "line 2: not JSON"),
    ([1, 2], "line 2: expected a JSON object"),
    ({"text": "x"}, 'line 2: expected "messages"'),
    ({"messages": []}, "line 2: messages: List should have at least 1 item"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "line 2: messages.0.role: Input should be"),
    ({"messages": [{"role": "user", "content": "x", "weight": 1}]}, "weight is only for assistant messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
     "no assistant message to train on"),
    ({"messages": [{"role": "assistant", "content": "y", "wieght": 0}]}, "messages.0.wieght: Extra inputs"),
    ({"prompt": "p", "completion": "c"}, "line 2: a prompt_completion line in a chat file"),
])
def test_bad_lines_are_named_by_number_and_field(record, expected):
    good = {"messages": [{"role": "user", "content": "secret-ish text"}, {"role": "assistant", "content": "ok"}]}
    lines = jsonl(good) + ([record + "\n"] if isinstance(record, str) else jsonl(record))
    with pytest.raises(DataError, match="^bad.jsonl: ") as raised:
        parse_jsonl("bad.jsonl", lines)
    assert expected in str(raised.value)
    assert "secret-ish" not in str(raised.value) and "robot" not in str(raised.value)  # no value is quoted


def test_every_bad_line_up_to_a_limit_is_reported_at_once():
    lines = jsonl(*[{"prompt": "p"}] * 8)
    with pytest.raises(DataError) as raised:
        parse_jsonl("many.jsonl", lines, max_errors=3)
    message = str(raised.value)
    assert message.count("completion: Field required") == 3 and "line 3" in message and "line 4" not in message


def test_a_file_without_lines_is_refused():
    with pytest.raises(DataError, match="holds no examples"):
        parse_jsonl("empty.jsonl", ["\n", "  \n"])


def test_preference_lines_take_one_answer_each_and_no_tools():
    base = {"input": {"messages": [{"role": "user", "content": "x"}]},
            "preferred_output": [{"role": "assistant", "content": "a"}],
            "non_preferred_output": [{"role": "assistant", "content": "b"}]}
    for change, expected in [({"preferred_output": []}, "preferred_output: List should have at least 1 item"),
                             ({"input": {**base["input"], "tools": []}}, "input: tools not supported"),
                             ({"non_preferred_output": [{"role": "user", "content": "b"}]},
                              "non_preferred_output.0.role")]:
        with pytest.raises(DataError, match="line 1: ") as raised:
            parse_jsonl("dpo.jsonl", jsonl({**base, **change}))
        assert expected in str(raised.value)
