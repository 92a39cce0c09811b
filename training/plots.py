"""Matplotlib figures: learning curves, confusion matrix, probability distribution, fold bars."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# Figures are built without pyplot: no global state, safe from Optuna's worker threads, and
# no display needed.


def learning_curves(history: list[dict[str, float]]) -> Figure:
    """Loss, accuracy and macro F1 per epoch across both stages, stage boundary marked."""
    frame = pd.DataFrame(history)
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    panels = [
        ("loss", ["train_loss", "val_loss"]),
        ("accuracy", ["train_accuracy", "val_accuracy"]),
        ("macro F1", ["val_f1_macro"]),
    ]
    steps = frame["step"] + 1
    for ax, (title, columns) in zip(axes, panels, strict=True):
        for column in columns:
            ax.plot(steps, frame[column], marker="o", markersize=3, label=column)
        for boundary in frame.loc[frame["stage"].diff() > 0, "step"]:
            ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("epoch (both stages)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("learning curves (dashed line: stage 1 → stage 2)")
    fig.tight_layout()
    return fig


def confusion_matrix_figure(counts: list[list[int]], class_names: list[str], title: str) -> Figure:
    """Counts annotated on a row-normalised colour scale."""
    counts_array = np.asarray(counts)
    rows = counts_array.sum(axis=1, keepdims=True)
    normalised = np.divide(counts_array, rows, out=np.zeros(counts_array.shape), where=rows > 0)
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            colour = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts_array[i, j]), ha="center", va="center", color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def probability_distribution(probs: np.ndarray, targets: np.ndarray) -> Figure:
    """Histogram of the probability given to the true class, split by right / wrong."""
    true_prob = probs[np.arange(len(targets)), targets]
    correct = probs.argmax(axis=1) == targets
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    bins = np.linspace(0, 1, 21)
    ax.hist(true_prob[correct], bins=bins, alpha=0.7, label=f"correct ({correct.sum()})")
    ax.hist(true_prob[~correct], bins=bins, alpha=0.7, label=f"wrong ({(~correct).sum()})")
    ax.set_xlabel("predicted probability of the true class")
    ax.set_ylabel("images")
    ax.set_title("predicted-probability distribution (validation)")
    ax.legend()
    fig.tight_layout()
    return fig


def fold_bars(values: list[float], metric: str, reference: float | None = None) -> Figure:
    """One bar per fold, with the mean (and an out-of-fold reference) as lines."""
    fig = Figure(figsize=(max(4, len(values) * 0.8 + 2), 4))
    ax = fig.subplots()
    folds = list(range(len(values)))
    ax.bar(folds, values, color="tab:blue")
    ax.set_xticks(folds)
    ax.axhline(float(np.mean(values)), color="black", linestyle="--", label="mean")
    if reference is not None:
        ax.axhline(reference, color="tab:orange", linestyle=":", label="out-of-fold")
    low = min(values + ([reference] if reference is not None else []))
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel("fold")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per fold")
    ax.legend()
    fig.tight_layout()
    return fig
