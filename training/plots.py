"""Matplotlib figures: curves, confusion, probabilities, fold bars, reliability, galleries."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
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


def _row_normalised(counts: np.ndarray) -> np.ndarray:
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)


def confusion_matrix_figure(counts: list[list[int]], class_names: list[str], title: str) -> Figure:
    """Counts annotated on a row-normalised colour scale."""
    counts_array = np.asarray(counts)
    normalised = _row_normalised(counts_array)
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


def confusion_matrix_frames(
    confusions: dict[int, np.ndarray], class_names: list[str]
) -> Iterator[tuple[int, np.ndarray]]:
    """(step, RGB image) of the validation confusion matrix at every step: one figure, laid
    out once and redrawn with each step's counts (a figure per step cost ~4x as much)."""
    steps = sorted(confusions)
    if not steps:
        return
    first = np.asarray(confusions[steps[0]])
    figure = confusion_matrix_figure(first.tolist(), class_names, f"validation, step {steps[0]}")
    ax = figure.axes[0]
    canvas = FigureCanvasAgg(figure)
    for step in steps:
        counts = np.asarray(confusions[step])
        normalised = _row_normalised(counts)
        ax.images[0].set_data(normalised)
        for text, count, share in zip(ax.texts, counts.ravel(), normalised.ravel(), strict=True):
            text.set_text(str(count))
            text.set_color("white" if share > 0.5 else "black")
        ax.set_title(f"validation, step {step}")
        canvas.draw()
        yield step, np.asarray(canvas.buffer_rgba())[..., :3].copy()


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


def reliability_diagram(bins: dict, ece: float, title: str) -> Figure:
    """Accuracy against confidence per bin (bars) beside the diagonal of perfect calibration,
    with the share of images in each bin underneath."""
    edges = np.asarray(bins["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    accuracy = np.nan_to_num(np.asarray(bins["accuracy"], dtype=float))
    counts = np.asarray(bins["count"])
    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres, accuracy, width=width, edgecolor="black", alpha=0.8, label="accuracy")
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"{title} (ECE {ece:.3f})")
    top.legend(loc="upper left")
    bottom.bar(centres, counts / max(counts.sum(), 1), width=width, color="tab:grey")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("share")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    return fig


def misclassified_sheet(images: list[np.ndarray], table: pd.DataFrame, title: str) -> Figure:
    """The worst misclassified images (rows of metrics.misclassified, in order) with true /
    predicted / p(predicted) / p(true) under each."""
    captions = [
        f"true {row.true} / pred {row.predicted}\np(pred) {row.p_predicted:.2f}, "
        f"p(true) {row.p_true:.2f}"
        for row in table.itertuples()
    ]
    return contact_sheet(images, captions, title)


def contact_sheet(images: list[np.ndarray], captions: list[str], title: str) -> Figure:
    """A grid of images, each with its caption underneath (e.g. true / predicted / p)."""
    count = max(1, len(images))
    columns = min(8, count)
    rows = -(-count // columns)
    fig = Figure(figsize=(1.9 * columns, 2.2 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, caption in zip(axes, images, captions, strict=False):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(caption, fontsize=7)
    if not images:
        axes[0].text(0.5, 0.5, "no misclassified image", ha="center", va="center")
    fig.suptitle(title)
    # Every axis is off: a fixed layout (room for the title and two-line captions) looks as
    # tight_layout's and costs a fraction of it, which each run pays.
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / height, hspace=0.3)
    return fig
