"""Voting methods against hand-computed numbers, underflow-free geometric mean, TTA views."""

from __future__ import annotations

import numpy as np
import pytest

from registry.tta import View, apply_view, tta_views
from registry.voting import (
    average_views,
    combine,
    geometric_mean,
    hard_vote,
    log_softmax,
    metric_weights,
)

# Two members, two images, three classes.
PROBS = np.array(
    [
        [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]],
        [[0.2, 0.5, 0.3], [0.1, 0.7, 0.2]],
    ]
)


def test_arithmetic_mean_by_hand():
    labels, probs = combine(np.log(PROBS), "arithmetic")
    assert np.allclose(probs, [[0.4, 0.4, 0.2], [0.15, 0.45, 0.4]])
    # Image 0 is a 0.4 / 0.4 tie; image 1 has a clear winner.
    assert labels[1] == 1


def test_weighted_mean_by_hand():
    labels, probs = combine(np.log(PROBS), "weighted", weights=[3.0, 1.0])  # → 0.75 / 0.25
    assert np.allclose(probs[0], [0.75 * 0.6 + 0.25 * 0.2, 0.75 * 0.3 + 0.25 * 0.5, 0.15])
    assert np.allclose(probs[1], [0.175, 0.325, 0.5])
    assert labels.tolist() == [0, 2]


def test_geometric_mean_by_hand():
    two = np.log(np.array([[[0.8, 0.2]], [[0.5, 0.5]]]))
    labels, probs = combine(two, "geometric")
    # sqrt(0.8 * 0.5) = 0.6325, sqrt(0.2 * 0.5) = 0.3162, renormalised: 2/3 and 1/3.
    assert np.allclose(probs, [[2 / 3, 1 / 3]])
    assert labels.tolist() == [0]


def test_geometric_mean_of_tiny_probabilities_does_not_underflow():
    members = np.array([[[1e-300, 2e-300, 1.0]]] * 3)  # a raw product would be 1e-900 → 0.0
    assert np.prod(members, axis=0)[0, 0] == 0.0  # seed 004's way loses the ratio
    probs = geometric_mean(np.log(members))
    assert np.all(probs > 0) and np.all(np.isfinite(probs))
    assert probs[0, 1] / probs[0, 0] == pytest.approx(2.0, rel=1e-9)
    assert probs.sum() == pytest.approx(1.0)
    # From logits as the pyfunc computes them: log-probs near -700 stay exact in float64.
    logits = np.array([[[-690.0, -689.0, 0.0]], [[-700.0, -699.0, 0.0]]])
    probs = geometric_mean(log_softmax(logits))
    assert probs[0, 1] / probs[0, 0] == pytest.approx(np.e, rel=1e-9)


def test_hard_vote_majority_by_hand():
    three = np.log(
        np.array(
            [
                [[0.5, 0.4, 0.1]],
                [[0.1, 0.6, 0.3]],
                [[0.2, 0.7, 0.1]],
            ]
        )
    )
    labels, shares = hard_vote(three)
    assert labels.tolist() == [1]
    assert np.allclose(shares, [[1 / 3, 2 / 3, 0.0]])


def test_hard_vote_tie_is_broken_by_the_soft_mean_not_class_order():
    # One vote each for class 0 and class 2; the mean probability of class 2 is higher.
    tie = np.log(np.array([[[0.40, 0.25, 0.35]], [[0.05, 0.10, 0.85]]]))
    labels, shares = combine(tie, "hard")
    assert np.allclose(shares, [[0.5, 0.0, 0.5]])
    assert labels.tolist() == [2]
    # Class 1 has the highest mean (0.40) but no vote: only tied classes can win.
    no_vote = np.log(np.array([[[0.40, 0.35, 0.25]], [[0.05, 0.45, 0.50]]]))
    assert combine(no_vote, "hard")[0].tolist() == [2]


def test_metric_weights_follow_the_direction():
    assert np.allclose(metric_weights([0.9, 0.6], "max"), [0.6, 0.4])
    assert np.allclose(metric_weights([0.2, 0.6], "min"), [0.75, 0.25])  # 1/0.2 : 1/0.6
    assert np.allclose(metric_weights([0.0, 0.0], "max"), [0.5, 0.5])


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown voting method"):
        combine(np.log(PROBS), "median")


def test_views_average_per_method():
    views = np.log(np.array([[[0.8, 0.2]], [[0.5, 0.5]]]))
    assert np.allclose(np.exp(average_views(views, "arithmetic")), [[0.65, 0.35]])
    assert np.allclose(np.exp(average_views(views, "geometric")), [[2 / 3, 1 / 3]])


def test_tta_views_are_deterministic_and_nested():
    np.random.seed(1)
    first = tta_views(6)
    np.random.seed(99)  # global random state must not matter
    assert tta_views(6) == first
    assert tta_views(4) == first[:4]
    assert first[0] == View() and first[1] == View(flip=True)
    for view in first[2:]:
        assert 0.8 <= view.height <= 0.95 and view.top + view.height <= 1.0
    with pytest.raises(ValueError, match="tta"):
        tta_views(0)


def test_apply_view_crops_and_flips():
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    assert np.array_equal(apply_view(image, View()), image)
    assert np.array_equal(apply_view(image, View(flip=True)), image[:, ::-1])
    crop = apply_view(image, View(top=0.2, left=0.5, height=0.5, width=0.5))
    assert np.array_equal(crop, image[2:7, 10:20])
    assert np.array_equal(apply_view(image, tta_views(5)[4]), apply_view(image, tta_views(5)[4]))
