"""Classification metrics from probabilities and targets, as plain floats and arrays."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
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
