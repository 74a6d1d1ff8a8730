"""Job data: the offline sentiment set loads from its installed package, and balanced splits are balanced,
disjoint, random (not the first rows) and reproducible."""

from __future__ import annotations

from collections import Counter

import pytest

from sglang_mezo.jobs.data import balanced_split, rotten_tomatoes


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
