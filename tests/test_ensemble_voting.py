"""Voting methods against hand-computed numbers, underflow-free geometric mean, TTA views."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from registry.comparison import comparison_table, f1_interval, macro_f1
from registry.tta import View, apply_view, tta_views
from registry.voting import (
    average_views,
    combine,
    geometric_mean,
    hard_vote,
    log_softmax,
    metric_weights,
    vote,
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


def test_vote_divides_every_view_by_the_temperature_before_averaging():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(2, 3, 4, 5))  # M, V, N, C
    labels, probs = vote(log_softmax(logits), "arithmetic", temperature=2.5)
    by_hand = np.exp(log_softmax(logits / 2.5)).mean(axis=(0, 1))  # equal weights, views
    assert np.allclose(probs, by_hand) and labels.tolist() == by_hand.argmax(1).tolist()
    plain = vote(log_softmax(logits), "arithmetic")[1]
    assert np.allclose(plain, np.exp(log_softmax(logits)).mean(axis=(0, 1)))
    # Geometric voting: T scales a mean of log-probabilities, so no label can change.
    assert np.array_equal(
        vote(log_softmax(logits), "geometric", temperature=0.3)[0],
        vote(log_softmax(logits), "geometric")[0],
    )


def test_vectorised_macro_f1_is_scikit_learns():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 4, size=(3, 50))  # 3 resamples; class 4 never occurs
    preds = np.where(rng.random((3, 50)) < 0.6, targets, rng.integers(0, 4, size=(3, 50)))
    expected = [
        f1_score(t, p, labels=range(5), average="macro", zero_division=0)
        for t, p in zip(targets, preds, strict=True)
    ]
    assert np.allclose(macro_f1(targets, preds, 5), expected)


def test_bootstrap_interval_is_seeded_and_holds_the_point_estimate():
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 3, size=120)
    preds = np.where(rng.random(120) < 0.8, targets, rng.integers(0, 3, size=120))
    point = macro_f1(targets, preds, 3)
    low, high = f1_interval(targets, preds, 3, seed=7)
    assert (low, high) == f1_interval(targets, preds, 3, seed=7)
    assert (low, high) != f1_interval(targets, preds, 3, seed=8)
    assert low < point < high and high - low < 0.3
    # All right: every resample scores 1 (BCa is undefined there; the percentile interval).
    assert f1_interval(targets, targets, 3, seed=7) == (1.0, 1.0)


def test_comparison_rows_and_latency_multipliers():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 3, size=40)
    logits = rng.normal(size=(2, 4, 40, 3)) + 2.0 * np.eye(3)[targets]  # M, V, N, C
    seconds = {("member 0", 1): 0.5, ("member 0", 4): 2.0, ("member 1", 1): 0.5}
    seconds |= {("member 1", 4): 2.0, ("ensemble", 1): 1.0, ("ensemble", 4): 4.0}
    table = comparison_table(log_softmax(logits), targets, [3, 1], [0.5, 0.5], 2.0, 4, seconds, 0)
    assert len(table) == 2 * 2 + 3 * 2 * 2 + 2
    assert table.iloc[0][["model", "tta", "latency_x"]].tolist() == ["member 0 (fold 3)", 1, 1.0]
    ensemble = table[table["model"] == "ensemble"]
    assert sorted(set(ensemble["latency_x"])) == [2.0, 8.0]
    member = table.iloc[1]  # member 0 with 4 views, by hand
    labels = np.exp(log_softmax(logits[0])).mean(axis=0).argmax(axis=1)
    assert member["f1_macro"] == pytest.approx(f1_score(targets, labels, average="macro"))
    assert member["accuracy"] == pytest.approx((labels == targets).mean())
