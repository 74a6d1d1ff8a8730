"""The pieces of OpenAI's fine-tuning API without a server: uploads on disk, OpenAI's hyper-parameters as MeZO
steps, chat turns through a chat template, and cursor pagination. (The routes, end to end with the ``openai``
client, are in ``test_openai_server.py``.)"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import ValidationError
from tiny_models import save_tiny_llama
from transformers import AutoTokenizer

from sglang_mezo.server.fine_tuning.files import FileStore
from sglang_mezo.server.fine_tuning.routes import page
from sglang_mezo.server.fine_tuning.schemas import JobCreate
from sglang_mezo.server.fine_tuning.hyperparameters import resolve
from sglang_mezo.server.fine_tuning.translate import FileTranslator
from sglang_mezo.server.translate import Translator
from sglang_mezo.core.objectives import CompletionExample, PreferenceExample
from sglang_mezo.jobs.data import DataError
from sglang_mezo.jobs.errors import Forbidden, InvalidRequest, NotFound, TooMany
from sglang_mezo.jobs.openai_data import parse_jsonl
from sglang_mezo.jobs.spec import step_batches
from sglang_mezo.options import Limits

CHAT = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0}, ' \
       '{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}\n'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path_factory.mktemp("tok"), seed=0))
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def test_a_chat_turn_is_the_conversation_before_it_then_the_turn_as_the_template_writes_it(tokenizer):
    examples = FileTranslator(Translator(tokenizer, 512)).examples("c.jsonl", parse_jsonl("c.jsonl", [CHAT]))
    assert len(examples) == 1  # the weight-0 turn is context
    (example,) = examples
    ids = lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert isinstance(example, CompletionExample)
    assert example.prompt_ids == ids("<|user|>Hi<|end|><|assistant|>Hello<|end|><|user|>Bye<|end|><|assistant|>")
    assert example.completion_ids == ids("Ciao<|end|>")  # the end of the turn is learned too


def test_preference_pairs_share_the_prompt_and_carry_beta(tokenizer):
    line = ('{"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": '
            '"assistant", "content": "Hello"}], "non_preferred_output": [{"role": "assistant", "content": "Go"}]}\n')
    (pair,) = FileTranslator(Translator(tokenizer, 512)).examples("p.jsonl", parse_jsonl("p.jsonl", [line]), beta=0.3)
    assert isinstance(pair, PreferenceExample) and pair.beta == 0.3 and pair.reference is None
    ids = lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (
        ids("<|user|>Hi<|end|><|assistant|>"), ids("Hello<|end|>"), ids("Go<|end|>"))


def test_lines_the_model_cannot_take_are_named(tokenizer):
    too_long = '{"prompt": "' + "word " * 300 + '", "completion": "x"}\n'
    with pytest.raises(DataError, match=r"^l.jsonl, line 2: \d+ tokens; it must be shorter than the model's context"):
        FileTranslator(Translator(tokenizer, 512)).examples("l.jsonl", parse_jsonl("l.jsonl", ['{"prompt": "a", '
                                                                                          '"completion": "b"}\n',
                                                                                          too_long]))
    rewriting = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    # a template that drops earlier assistant turns once another follows: no turn has tokens of its own
    rewriting.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                               "{{ m['content'] }};{% endif %}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(DataError, match="line 1: the model's chat template does not write this assistant turn"):
        FileTranslator(Translator(rewriting, 512)).examples("c.jsonl", parse_jsonl("c.jsonl", [CHAT]))


def test_openai_hyper_parameters_as_steps():
    def job(**hyper) -> JobCreate:
        return JobCreate(model="m", training_file="file-x", hyperparameters=hyper)

    limits = Limits()
    # batch 16 of 40: 2 whole batches an epoch (the runner's step_batches; the other 8 wait for another shuffle),
    # so 50 epochs make 100 steps
    auto = resolve(job(), 40, limits)
    assert (auto.batch_size, auto.n_epochs, auto.lr_multiplier, auto.steps, auto.beta) == (16, 50, 1.0, 100, None)
    given = resolve(job(batch_size=4, n_epochs=3, learning_rate_multiplier=0.5), 10, limits)
    assert given.steps == 6 and given.lr_multiplier == 0.5
    # what the runner will do with those steps: each epoch's steps are whole batches of distinct examples
    picks = step_batches(10, 4, 0, range(given.steps))
    assert all(len(p) == 4 for p in picks) and all(len(set(picks[2 * e] + picks[2 * e + 1])) == 8 for e in range(3))
    assert resolve(job(), 5, limits).batch_size == 5  # fewer examples than a batch: every one each step
    dpo = JobCreate(model="m", training_file="f", method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
    assert resolve(dpo, 16, limits).beta == 0.2
    with pytest.raises(InvalidRequest, match="--mezo-max-steps-per-job"):
        resolve(job(n_epochs=100, batch_size=1), 200, limits)
    for bad in ({"learning_rate_multiplier": 0}, {"n_epochs": 0}, {"batch_size": -1}, {"n_epochs": "many"}):
        with pytest.raises(ValidationError, match=next(iter(bad))):  # a 400 when the job is created
            job(**bad)


def test_uploads_are_kept_under_server_made_ids(tmp_path):
    store = FileStore(tmp_path / "files", max_files=2)
    first = store.create("../../etc/passwd", "fine-tune", b'{"prompt": "a"}\n')
    assert first.filename == "passwd" and store.path(first.id).read_bytes() == b'{"prompt": "a"}\n'
    assert store.path(first.id).parent == tmp_path / "files"
    second = store.create("b.jsonl", "fine-tune", b"x")
    assert {f.id for f in store.list()} == {first.id, second.id}
    with pytest.raises(TooMany, match="--mezo-max-stored-files"):
        store.create("c.jsonl", "fine-tune", b"x")
    store.delete(first.id)
    assert [f.id for f in store.list()] == [second.id]
    for bad in (first.id, "../files/x", "file-" + "0" * 24):
        with pytest.raises(NotFound):
            store.get(bad)
    with pytest.raises(InvalidRequest, match="purpose"):
        store.create("d.jsonl", "assistants", b"x")
    with pytest.raises(InvalidRequest, match="empty"):
        store.create("d.jsonl", "fine-tune", b"")
    with pytest.raises(Forbidden, match="--mezo-data-dir"):
        FileStore(None, 1).create("a.jsonl", "fine-tune", b"x")


def test_an_unwritable_folder_is_a_403_that_does_not_name_it(tmp_path):
    (tmp_path / "taken").write_text("a file where the folder would be")
    store = FileStore(tmp_path / "taken" / "files", max_files=2)
    with pytest.raises(Forbidden, match="cannot write its uploads' folder") as refused:
        store.create("a.jsonl", "fine-tune", b"x")
    assert str(tmp_path) not in str(refused.value)
    assert store.list() == []


@dataclass
class Item:
    id: str


def test_cursor_pagination():
    items = [Item(f"i{k}") for k in range(5)]
    first = page(items, None, 2)
    assert [i.id for i in first.data] == ["i0", "i1"] and first.has_more and first.last_id == "i1"
    rest = page(items, "i3", 10)
    assert [i.id for i in rest.data] == ["i4"] and not rest.has_more
    assert page(items, "i4", 3).data == [] and not page(items, "i4", 3).has_more
    with pytest.raises(InvalidRequest, match="after"):
        page(items, "nope", 2)
