"""Near-duplicate search on real digits with planted copies: found, few false, kept in one fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.leakage_check import KINDS, plant_digit_copies
from training.leakage import (
    DuplicateSearch,
    describe_pairs,
    duplicate_groups,
    find_near_duplicates,
    leakage_metrics,
    pairs_across,
)
from training.splits import assign_folds


@pytest.fixture(scope="module")
def planted_runs():
    """Two independent plantings and the pairs found: 300 random real digits (8x8 PNGs read
    at <= 32 px as in the demo) + 10 copies of each kind: exact, resized to 32 px, JPEG q=70,
    ~5 % crop at an offset, 1-2 px (3-6 %) shift (bench/leakage_check.py)."""
    runs = []
    for seed in (0, 1):
        images, labels, planted = plant_digit_copies(seed)
        runs.append((images, labels, planted, find_near_duplicates(images)))
    return runs


def _pair_set(pairs: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(pairs["index_a"].tolist(), pairs["index_b"].tolist(), strict=True))


def test_planted_copies_are_found_with_few_false_pairs(planted_runs):
    found = false = planted_total = 0
    for images, _, planted, pairs in planted_runs:
        truth = {(original, copy) for original, copy, _ in planted}
        reported = _pair_set(pairs)
        found += len(reported & truth)
        false += len(reported - truth)  # any other pair, incl. look-alike originals
        planted_total += len(truth)
        assert len(images) == 350
    assert found >= 0.95 * planted_total, (found, planted_total)
    assert false <= 0.01 * (found + false), (false, found)


def test_every_kind_of_copy_is_found(planted_runs):
    images, _, planted, pairs = planted_runs[0]
    reported = _pair_set(pairs)
    for kind in KINDS:
        hits = sum((a, b) in reported for a, b, k in planted if k == kind)
        assert hits >= 9, (kind, hits)
    exact = pairs[pairs["method"] == "exact"]
    assert len(exact) == 10 and (exact["score"] == 1.0).all()


def test_grouping_puts_no_planted_pair_across_folds(planted_runs):
    for images, labels, planted, pairs in planted_runs:
        truth = pd.DataFrame(
            [(a, b) for a, b, _ in planted if (a, b) in _pair_set(pairs)],
            columns=["index_a", "index_b"],
        )
        ungrouped = assign_folds(labels, None, 5, seed=42)
        assert pairs_across(truth, ungrouped) > 0  # without grouping, copies do leak
        groups = duplicate_groups(len(images), pairs)
        folds = assign_folds(labels, groups, 5, seed=42)
        assert pairs_across(pairs, folds) == 0
        assert pairs_across(truth, folds) == 0


def test_explicit_groups_and_duplicate_groups_combine():
    pairs = pd.DataFrame(
        {"index_a": [0, 4], "index_b": [1, 5], "method": "ncc", "score": [0.995, 0.999]}
    )
    explicit = np.array(["p1", "p2", "p2", "p3", "p4", "p5"])
    groups = duplicate_groups(6, pairs, explicit)
    # 0-1 duplicates, 1-2 same person: one group; 3 alone; 4-5 duplicates.
    assert groups[0] == groups[1] == groups[2]
    assert len({groups[0], groups[3], groups[4]}) == 3 and groups[4] == groups[5]
    assert len(set(duplicate_groups(6, pairs.iloc[:0]))) == 6
    with pytest.raises(ValueError, match="5 group ids for 6 images"):
        duplicate_groups(6, pairs, explicit[:5])


def test_flat_and_identical_images_are_exact_pairs_and_different_ones_are_not():
    rng = np.random.default_rng(0)
    black = np.zeros((20, 20, 3), dtype=np.uint8)
    texture = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    pairs = find_near_duplicates([black, texture, black.copy(), other, texture.copy()])
    assert _pair_set(pairs) == {(0, 2), (1, 4)}
    assert set(pairs["method"]) == {"exact"}
    assert find_near_duplicates([texture]).empty and find_near_duplicates([]).empty


def test_split_counts_and_the_pairs_table():
    pairs = pd.DataFrame(
        {"index_a": [0, 1], "index_b": [2, 3], "method": ["exact", "ncc"], "score": [1.0, 0.99]}
    )
    val_mask = np.array([True, False, False, False])
    assert leakage_metrics(pairs, val_mask) == {
        "near_duplicate_pairs": 2,
        "near_duplicates_across_split": 1,
    }
    assert leakage_metrics(pairs) == {"near_duplicate_pairs": 2}
    table = pd.DataFrame({"path": list("abcd"), "label": ["x", "y", "x", "y"]})
    described = describe_pairs(pairs, table, val_mask)
    assert described[["path_a", "path_b", "label_a", "across"]].values.tolist() == [
        ["a", "c", "x", True],
        ["b", "d", "y", False],
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"crops": (0.9, 1.0)}, "crops"),
        ({"max_shift": 8}, "max_shift"),
    ],
)
def test_bad_search_settings_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        DuplicateSearch(**options)
