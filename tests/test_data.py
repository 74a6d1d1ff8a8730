"""Job data: records load from every supported format, templates render examples and hold out balanced sets,
the offline sentiment set loads from its installed package, and balanced splits are balanced, disjoint, random
(not the first rows) and reproducible."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from sglang_mezo.jobs.data import (DataError, Records, balanced_split, examples_from_records, load_records,
                                   rotten_tomatoes)
from sglang_mezo.jobs.templates import ClassificationTemplate, GenerationTemplate, MultipleChoiceTemplate, TextChoice


def test_balanced_split_is_balanced_disjoint_random_and_seeded():
    # sorted by label, as files often are: "the first N rows" would be all one class
    items = [(f"neg {i}", 0) for i in range(300)] + [(f"pos {i}", 1) for i in range(200)]
    train, held_out = balanced_split(items, per_class=[50, 20], seed=3)
    assert Counter(label for _, label in train) == {0: 50, 1: 50}
    assert Counter(label for _, label in held_out) == {0: 20, 1: 20}
    assert not {t for t, _ in train} & {t for t, _ in held_out}
    negatives = sorted(int(t.split()[1]) for t, label in train if label == 0)
    assert negatives != list(range(50)) and max(negatives) > 100  # drawn from the whole class
    assert [label for _, label in train[:10]] != [0] * 10  # shuffled, not grouped by class
    assert balanced_split(items, [50, 20], seed=3) == [train, held_out]
    assert balanced_split(items, [50, 20], seed=4) != [train, held_out]
    with pytest.raises(ValueError, match="label 1 has 200"):
        balanced_split(items, [150, 60], seed=0)


def test_rotten_tomatoes_is_read_from_the_installed_package():
    data = rotten_tomatoes()
    counts = Counter(label for _, label in data)
    assert counts[0] > 1000 and counts[1] > 1000, counts
    assert all(text and label in (0, 1) for text, label in data)


def inline(rows: list[dict]) -> Records:
    return Records(Path("inline"), rows)


RECORDS = [{"text": f"review {i}", "label": i % 2, "sentiment": "pos" if i % 2 else "neg"} for i in range(40)]


def write_all_formats(tmp_path, records: list[dict]) -> dict[str, object]:
    import datasets

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "data.json").write_text(json.dumps(records))
    with (tmp_path / "data.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    data = datasets.Dataset.from_list(records)
    data.to_parquet(str(tmp_path / "data.parquet"))
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "saved"))
    return {"jsonl": jsonl, "json": tmp_path / "data.json", "csv": tmp_path / "data.csv",
            "parquet": tmp_path / "data.parquet", "datasets": tmp_path / "saved"}


def test_records_load_from_every_format(tmp_path):
    for fmt, path in write_all_formats(tmp_path, RECORDS).items():
        records = load_records(path, split="train")
        # CSV has no types: every value is text
        expected = [{k: str(v) for k, v in r.items()} for r in RECORDS] if fmt == "csv" else RECORDS
        assert records.rows == expected, fmt
        if fmt in ("jsonl", "csv"):  # where each record is, for messages
            assert records.lines == list(range(1, 41)) if fmt == "jsonl" else list(range(2, 42))
    with pytest.raises(DataError, match="name one with split"):
        load_records(tmp_path / "saved")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl, line 3: not JSON"):
        load_records(tmp_path / "bad.jsonl")


SECRET = "hunter2"


@pytest.mark.parametrize("text, template, words", [
    # a password file read as CSV: its first line is the header, every later line a record
    (f"root:{SECRET}:0:0\nuser:{SECRET}:1:1\n", GenerationTemplate(prompt="{a}", completion=" {b}"),
     ["secret.csv, line 2", "needs field(s) ['a']"]),
    (f"label,text\n{SECRET},x\n", ClassificationTemplate(labels=("neg", "pos")),
     ["secret.csv, line 2", "field 'label' is not one of the labels"]),
    (f"label,text\n{SECRET},x\n", ClassificationTemplate(), ["secret.csv, line 2", "not a class index"]),
    (f"label,text\n7,{SECRET}\n", ClassificationTemplate(), ["secret.csv, line 2", "not an index of the 2"]),
    (f"a,b\n{SECRET},{SECRET},{SECRET}\n", GenerationTemplate(prompt="{a}", completion=" {b}"),
     ["secret.csv, line 2", "more values than the header"]),
])
def test_no_message_quotes_the_file(tmp_path, text, template, words):
    """A request can name any file the server may read: a message names the file, the line and what was expected,
    never what the file holds (the fields' names of a CSV are its first line)."""
    path = tmp_path / "secret.csv"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        examples_from_records(load_records(path), template)
    message = str(error.value)
    assert SECRET not in message and "root" not in message and "7" not in message.split("line 2")[1], message
    for word in words:
        assert word in message, message


def test_templates_render_examples_and_hold_out_a_balanced_set():
    template = ClassificationTemplate(prompt="{text} It was", label_field="sentiment", labels=("neg", "pos"))
    train, held_out = examples_from_records(inline(RECORDS), template, eval_size=5, train_size=12, seed=1)
    assert len(train) == 12 and len(held_out) == 10
    assert Counter(e.label for e in held_out) == {0: 5, 1: 5}
    assert {e.prompt for e in train}.isdisjoint(e.prompt for e in held_out)
    assert held_out[0].options == (" terrible", " great") and held_out[0].prompt.endswith(" It was")
    by_index = examples_from_records(inline(RECORDS), ClassificationTemplate(), eval_size=5, seed=1)
    assert by_index[1] == held_out  # label values and class indices pick the same records

    choice = MultipleChoiceTemplate(prompt="Q: {q}\nA:", choices_field="c", label_field="a", labels=("A", "B", "C"))
    (example,), _ = examples_from_records(inline([{"q": "2+2?", "c": ["3", "4", "5"], "a": "B"}]), choice)
    assert example == TextChoice(prompt="Q: 2+2?\nA:", options=(" 3", " 4", " 5"), label=1)

    generation = GenerationTemplate(prompt="Translate: {src}", completion=" {tgt}")
    train, held_out = examples_from_records(inline([{"src": str(i), "tgt": str(-i)} for i in range(10)]),
                                            generation, eval_size=3, seed=0)
    assert len(train) == 7 and len(held_out) == 3 and train[0].completion.startswith(" ")

    with pytest.raises(DataError, match="inline, record 1: the prompt needs field"):
        examples_from_records(inline([{"body": "x", "label": 0}]), ClassificationTemplate())
    with pytest.raises(DataError, match="not one of the labels"):
        examples_from_records(inline([{"text": "x", "sentiment": "meh"}]), template)


def test_the_example_job_file_is_a_valid_request():
    """examples/sentiment_job.json, the README's `sglang-mezo train` example, passes the API's own validation."""
    from pathlib import Path

    from sglang_mezo.server.schemas import StepRequest

    job = StepRequest.model_validate_json((Path(__file__).parents[1] / "examples" / "sentiment_job.json").read_text())
    assert job.examples and job.eval_examples and job.eval_every
