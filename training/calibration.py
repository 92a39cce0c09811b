"""Temperature scaling: one scalar T that divides the logits, fitted to minimise the NLL."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

# T is searched on a log scale within [1/20, 20]: wide enough for any network seen in
# practice, bounded so that a degenerate set (all right, all wrong) cannot run away.
LOG_T_BOUNDS = (-np.log(20.0), np.log(20.0))


def scaled_log_probs(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """Log-probabilities after dividing the logits by `temperature` (log-probabilities are
    the logits up to a per-row constant, which softmax ignores)."""
    return log_softmax(np.asarray(log_probs, dtype=np.float64) / temperature, axis=-1)


def fit_temperature(log_probs: np.ndarray, targets: np.ndarray) -> float:
    """The T minimising the mean NLL of softmax(logits / T) on held-out predictions.

    Written with scipy's bounded scalar search: scikit-learn's temperature scaling lives
    inside CalibratedClassifierCV, which wants an estimator to refit, not stored logits."""
    rows = np.arange(len(targets))

    def nll(log_t: float) -> float:
        return float(-scaled_log_probs(log_probs, np.exp(log_t))[rows, targets].mean())

    found = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded")
    return float(np.exp(found.x))
