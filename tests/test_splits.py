"""Grouped holdout splits: the asked fraction, every class on both sides, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import DataError
from training.splits import holdout_split


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.4, 0.5])
def test_grouped_holdout_reaches_the_asked_fraction_within_one_group(fraction):
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 8, 80)  # groups of 1..7 images, as persons or videos are
    groups = np.repeat(np.arange(80), sizes)
    labels = np.repeat(rng.integers(0, 3, 80), sizes)
    mask = holdout_split(labels, groups, fraction, seed=3)
    assert not set(groups[mask]) & set(groups[~mask])
    assert abs(mask.sum() - fraction * len(labels)) <= sizes.max()  # 0.4 used to give 0.5
    for label in range(3):
        assert (labels[mask] == label).any() and (labels[~mask] == label).any()


def test_grouped_holdout_keeps_a_rare_class_on_both_sides():
    # 26 persons of 1-5 images; class 2 has 3 persons. One fold of StratifiedGroupKFold left
    # class 2 out of validation here (seed 1).
    sizes = [4, 3, 2, 2, 1, 1, 1, 1, 5, 4, 5, 3, 4, 5, 4, 4, 3, 3, 5, 2, 5, 4, 1, 2, 5, 3]
    person_class = [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 1, 1, 1, 0, 0, 0, 0, 0, 2, 1, 0, 1, 0, 2, 1]
    groups = np.repeat(np.arange(len(sizes)), sizes)
    labels = np.repeat(person_class, sizes)
    for seed in range(5):
        mask = holdout_split(labels, groups, 0.2, seed)
        for label in range(3):
            assert (labels[mask] == label).any() and (labels[~mask] == label).any(), seed


def test_too_few_groups_is_a_clear_error():
    labels, groups = np.array([0, 1, 0, 1]), np.array(["a", "a", "a", "a"])
    with pytest.raises(DataError, match="at least 2 groups, the data has 1"):
        holdout_split(labels, groups, 0.2, seed=0)


def test_a_class_in_a_single_group_is_named():
    labels = np.array(["cat", "cat", "dog", "dog", "bee", "bee"])
    groups = np.array(["a", "b", "c", "d", "e", "e"])
    with pytest.raises(DataError, match="class 'bee' cannot be on both sides"):
        holdout_split(labels, groups, 0.3, seed=0)
