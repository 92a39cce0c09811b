"""Classification metrics from probabilities and targets, as plain floats and arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
)


def classification_metrics(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 / precision / recall of argmax predictions."""
    preds = probs.argmax(axis=1)
    labels = np.arange(probs.shape[1])
    kwargs = {"labels": labels, "average": "macro", "zero_division": 0}
    return {
        "accuracy": float(accuracy_score(targets, preds)),
        "f1_macro": float(f1_score(targets, preds, **kwargs)),
        "precision_macro": float(precision_score(targets, preds, **kwargs)),
        "recall_macro": float(recall_score(targets, preds, **kwargs)),
    }


def confusion(targets: np.ndarray, preds: np.ndarray, class_names: list[str]) -> dict:
    """Counts and row-normalised confusion matrix, JSON-ready."""
    counts = confusion_matrix(targets, preds, labels=np.arange(len(class_names)))
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
    return {
        "class_names": list(class_names),
        "counts": counts.tolist(),
        "normalized": np.round(normalised, 6).tolist(),
    }


def _classification_report(
    targets: np.ndarray, preds: np.ndarray, class_names: list[str], **options
) -> dict | str:
    return classification_report(
        targets,
        preds,
        labels=np.arange(len(class_names)),  # every class, also one absent from this split
        target_names=list(class_names),
        zero_division=0,
        **options,
    )


def report(targets: np.ndarray, preds: np.ndarray, class_names: list[str]) -> dict:
    return _classification_report(targets, preds, class_names, output_dict=True)


def report_text(targets: np.ndarray, preds: np.ndarray, class_names: list[str]) -> str:
    return _classification_report(targets, preds, class_names, digits=4)


def per_class_metrics(
    targets: np.ndarray, probs: np.ndarray, class_names: list[str]
) -> dict[str, dict[str, float]]:
    """F1, precision and recall of every class (also one absent from this split: 0):
    {"f1": {class: value}, "precision": {...}, "recall": {...}}."""
    preds = probs.argmax(axis=1)
    labels = np.arange(len(class_names))
    kwargs = {"labels": labels, "average": None, "zero_division": 0}
    scores = {
        "f1": f1_score(targets, preds, **kwargs),
        "precision": precision_score(targets, preds, **kwargs),
        "recall": recall_score(targets, preds, **kwargs),
    }
    return {
        kind: {name: float(value) for name, value in zip(class_names, values, strict=True)}
        for kind, values in scores.items()
    }


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE: the confidence (max probability) in `bins` equal-width bins, the gap between each
    bin's mean confidence and its accuracy, weighted by the bin's share of images."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 joins bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(gap)


def reliability_bins(targets: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict:
    """Per confidence bin: its range, image count, mean confidence and accuracy (for the
    reliability diagram); empty bins have count 0 and NaN means."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    sums = np.bincount(index, weights=confidence, minlength=bins)
    hits = np.bincount(index, weights=correct.astype(float), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
            "count": counts.tolist(),
            "confidence": (sums / counts).tolist(),
            "accuracy": (hits / counts).tolist(),
        }


def negative_log_likelihood(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean -log p(true class) (scikit-learn's log loss over every class)."""
    return float(log_loss(targets, probs, labels=np.arange(probs.shape[1])))


def misclassified(
    paths: list[str], targets: np.ndarray, probs: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    """One row per wrong image: path, true, predicted, p(predicted), p(true); the most
    confidently wrong first. The frame's index is the image's position in the inputs."""
    preds = probs.argmax(axis=1)
    rows = np.flatnonzero(preds != targets)
    table = pd.DataFrame(
        {
            "path": [str(paths[i]) for i in rows],
            "true": [class_names[targets[i]] for i in rows],
            "predicted": [class_names[preds[i]] for i in rows],
            "p_predicted": probs[rows, preds[rows]],
            "p_true": probs[rows, targets[rows]],
        }
    )
    table.index = rows
    return table.sort_values("p_true", kind="stable")
