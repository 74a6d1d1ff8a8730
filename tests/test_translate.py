"""Turning text examples into token ids as the server's tokenizer does: plain prompts, and prompts wrapped in the
model's chat template (``"chat": true``)."""

from __future__ import annotations

import pytest
from fakes import CharTokenizer
from tiny_models import save_tiny_llama
from transformers import AutoTokenizer

from sglang_mezo.server.translate import Translator
from sglang_mezo.jobs.errors import InvalidRequest
from sglang_mezo.jobs.templates import TextChoice, TextCompletion

TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_wraps_the_prompt_as_the_users_turn_and_leaves_the_answers_alone(tmp_path):
    tok = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path, seed=0))
    tok.chat_template = TEMPLATE
    translator = Translator(tok, context_len=512)
    examples = [TextChoice("a fine film. Sentiment:", ("n", "y"), 1), TextCompletion("Capital of France?", " Paris")]
    plain = translator.tokenize(examples)
    chat = translator.tokenize(examples, chat=True)
    expected = tuple(tok("<|user|>a fine film. Sentiment:<|end|><|assistant|>", add_special_tokens=False)["input_ids"])
    assert chat[0].prompt_ids == expected and chat[0].prompt_ids != plain[0].prompt_ids
    assert chat[0].option_ids == plain[0].option_ids and chat[0].label == 1
    assert chat[1].completion_ids == plain[1].completion_ids


def test_chat_without_a_chat_template_is_a_clear_400():
    with pytest.raises(InvalidRequest, match="no chat template"):
        Translator(CharTokenizer(), context_len=64).tokenize([TextCompletion("hi", " there")], chat=True)
