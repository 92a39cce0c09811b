"""Calibration: ECE against a hand computation, and temperature scaling on held-out data."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibration import fit_temperature, scaled_log_probs
from training.metrics import (
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)


def test_ece_by_hand():
    # Confidences 0.95, 0.95 (bin 15: one right, one wrong), 0.55 (bin 9, right), 0.34
    # (bin 6, wrong). ECE = sum over bins of share * |mean confidence - accuracy|.
    probs = np.array([[0.95, 0.05, 0.0], [0.95, 0.05, 0.0], [0.45, 0.55, 0.0], [0.33, 0.33, 0.34]])
    targets = np.array([0, 1, 1, 0])
    expected = 2 / 4 * abs(0.95 - 0.5) + 1 / 4 * abs(0.55 - 1.0) + 1 / 4 * abs(0.34 - 0.0)
    assert expected_calibration_error(targets, probs, bins=15) == pytest.approx(expected)
    bins = reliability_bins(targets, probs, bins=15)
    assert bins["count"][14] == 2 and bins["accuracy"][14] == 0.5
    assert bins["count"][8] == 1 and bins["count"][5] == 1 and sum(bins["count"]) == 4


def test_a_perfectly_calibrated_set_has_zero_ece():
    probs = np.array([[0.5, 0.5]] * 4)
    targets = np.array([0, 1, 0, 1])  # argmax is 0: half right at confidence 0.5
    assert expected_calibration_error(targets, probs) == pytest.approx(0.0)


def test_temperature_lowers_the_nll_on_held_out_data():
    """Overconfident logits (true logits x 4): T fitted on one half cools the other."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 5))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = np.array([rng.choice(5, p=p) for p in probs])
    overconfident = np.log(probs) * 4.0
    fit, held_out = slice(0, 1000), slice(1000, None)
    temperature = fit_temperature(overconfident[fit], targets[fit])
    assert temperature == pytest.approx(4.0, rel=0.15)

    def nll(log_probs: np.ndarray) -> float:
        return negative_log_likelihood(targets[held_out], np.exp(log_probs))

    before = nll(scaled_log_probs(overconfident[held_out], 1.0))
    after = nll(scaled_log_probs(overconfident[held_out], temperature))
    assert after < before - 0.5
    ece_before = expected_calibration_error(
        targets[held_out], np.exp(scaled_log_probs(overconfident[held_out], 1.0))
    )
    ece_after = expected_calibration_error(
        targets[held_out], np.exp(scaled_log_probs(overconfident[held_out], temperature))
    )
    assert ece_after < ece_before
