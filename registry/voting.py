"""Ensemble voting over member log-probabilities: arithmetic, geometric, weighted, hard."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import logsumexp

from training.calibration import scaled_log_probs

METHODS = ("arithmetic", "geometric", "weighted", "hard")


# How vote (average_views, combine) works, for ensemble.json.
VOTING_RECIPE = (
    "Per member and view: log-probabilities = log_softmax(logits / T), T = the ensemble's "
    "`temperature` (fitted at promotion on the k-fold job's out-of-fold predictions; T = 1, "
    "i.e. log_softmax(logits), when a request asks calibrated=false). Per member, views are "
    "averaged: geometric = mean of the log-probabilities, renormalised (softmax of the "
    "mean); the other methods = mean of the probabilities. Then the members: arithmetic = "
    "mean of their probabilities; weighted = the same with the members' `weight` "
    "(normalised to sum 1); geometric = mean of their log-probabilities, renormalised; "
    "hard = each member votes its argmax, the most votes win, a tie is broken by the "
    "arithmetic mean of probabilities among the tied classes, and the probabilities "
    "returned are the vote shares. The label is the argmax of the probabilities."
)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities in float64; kept in log space so nothing underflows to 0."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits - logsumexp(logits, axis=-1, keepdims=True)


def normalise_weights(weights: Sequence[float] | None, members: int) -> np.ndarray:
    """Weights that sum to 1; None (or all zero) means equal weights."""
    if weights is None:
        return np.full(members, 1.0 / members)
    array = np.asarray(weights, dtype=np.float64)
    if array.shape != (members,):
        raise ValueError(f"{len(array)} weights given for {members} members")
    if np.any(array < 0) or not np.all(np.isfinite(array)):
        raise ValueError(f"weights must be finite and >= 0, got {array.tolist()}")
    total = array.sum()
    return array / total if total > 0 else np.full(members, 1.0 / members)


def metric_weights(values: Sequence[float], direction: str) -> np.ndarray:
    """Member weights from validation metric values: proportional to the value when higher is
    better, to its inverse when lower is better (a loss)."""
    array = np.asarray(values, dtype=np.float64)
    if direction == "min":
        array = np.where(array > 0, 1.0 / np.where(array > 0, array, 1.0), 0.0)
    return normalise_weights(np.clip(array, 0.0, None), len(array))


def arithmetic_mean(log_probs: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """Soft voting: (weighted) mean of the members' probabilities. (M, N, C) -> (N, C)."""
    w = normalise_weights(weights, len(log_probs))
    # log of sum_m w_m p_m, computed in log space, then back: exact and underflow-free.
    return np.exp(logsumexp(log_probs, axis=0, b=w[:, None, None]))


def geometric_mean(log_probs: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """Soft voting: (weighted) geometric mean renormalised. A mean of log-probabilities, never a
    raw product, so p = 1e-300 from several members does not underflow (seed 004's defect)."""
    w = normalise_weights(weights, len(log_probs))
    mean_log = np.tensordot(w, log_probs, axes=1)
    return np.exp(mean_log - logsumexp(mean_log, axis=-1, keepdims=True))


def hard_vote(log_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote of the members' argmax. Returns (labels, vote shares); a tie between
    classes is broken by the arithmetic mean of probabilities, never by class order."""
    members, rows, classes = log_probs.shape
    counts = np.zeros((rows, classes), dtype=np.int64)
    for member in range(members):
        np.add.at(counts, (np.arange(rows), log_probs[member].argmax(axis=1)), 1)
    tied = counts == counts.max(axis=1, keepdims=True)
    soft = arithmetic_mean(log_probs)
    labels = np.where(tied, soft, -np.inf).argmax(axis=1)
    return labels, counts / members


def combine(
    log_probs: np.ndarray, method: str, weights: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the ensemble from member log-probabilities (M, N, C).

    `weights` are used by `weighted` only; the other methods weigh members equally.
    For `hard`, the probabilities are the vote shares.
    """
    log_probs = np.asarray(log_probs, dtype=np.float64)
    if log_probs.ndim != 3 or len(log_probs) == 0:
        raise ValueError(f"expected member log-probabilities (M, N, C), got {log_probs.shape}")
    if method == "arithmetic":
        probs = arithmetic_mean(log_probs)
    elif method == "weighted":
        probs = arithmetic_mean(log_probs, weights)
    elif method == "geometric":
        probs = geometric_mean(log_probs)
    elif method == "hard":
        return hard_vote(log_probs)
    else:
        raise ValueError(f"unknown voting method {method!r}; use one of {METHODS}")
    return probs.argmax(axis=1), probs


def average_views(view_log_probs: np.ndarray, method: str) -> np.ndarray:
    """One member's TTA views (V, N, C) -> its log-probabilities (N, C). Views are averaged the
    way members are: in log space for `geometric`, as probabilities otherwise."""
    views = len(view_log_probs)
    if method == "geometric":
        mean_log = view_log_probs.mean(axis=0)
        return mean_log - logsumexp(mean_log, axis=-1, keepdims=True)
    return logsumexp(view_log_probs, axis=0) - np.log(views)


def vote(
    view_log_probs: np.ndarray,
    method: str,
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) from every member's per-view log-probabilities (M, V, N, C):
    each view's logits divided by `temperature` (log-probabilities are the logits up to a
    per-row constant), each member's views averaged, then the members combined."""
    view_log_probs = np.asarray(view_log_probs, dtype=np.float64)
    if view_log_probs.ndim != 4:
        raise ValueError(f"expected log-probabilities (M, V, N, C), got {view_log_probs.shape}")
    if temperature != 1.0:
        view_log_probs = scaled_log_probs(view_log_probs, temperature)
    members = np.stack([average_views(views, method) for views in view_log_probs])
    return combine(members, method, weights)
