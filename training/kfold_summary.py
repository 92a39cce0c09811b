"""Out-of-fold predictions and per-fold statistics of a k-fold job, from its fold runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
import pandas as pd

from training.honest_estimate import honest_fold_scores, honest_summary
from training.metric_keys import safe_name
from training.metrics import (
    classification_metrics,
    confusion,
    expected_calibration_error,
    misclassified,
    per_class_metrics,
    reliability_bins,
)
from training.tracking import get_run, load_artifact_csv

FOLD_METRICS = (
    "val_f1_macro",
    "val_accuracy",
    "val_loss",
    "val_precision_macro",
    "val_recall_macro",
    "val_ece",
)


@dataclass
class FoldSummary:
    """Everything the k-fold parent logs, as plain data (figures are drawn by the caller)."""

    per_fold: pd.DataFrame  # fold, run_id, the fold run's best_* metrics, its honest_* scores
    per_class: pd.DataFrame  # fold, class, f1, precision, recall (kept weights, val fold)
    oof: pd.DataFrame  # path, label, group, fold, predicted, prob_<class>... in data order
    metrics: dict[str, float]
    confusion: dict
    reliability: dict
    misclassified: pd.DataFrame  # index = the image's row in the data


def _fold_predictions(folds: pd.DataFrame, fold: int, run_id: str) -> pd.DataFrame:
    """The fold run's validation predictions, checked to be that fold's images in order: the
    same file names and labels (a fold process on another machine reads the data from
    another folder, so the full paths may differ)."""
    predictions = load_artifact_csv(run_id, "evaluation/val_predictions.csv")
    members = folds.index[folds["fold"] == fold]
    expected = folds.loc[members]
    same = len(predictions) == len(members) and all(
        (_names(predictions["path"]) == _names(expected["path"]))
        & (predictions["label"].astype(str).to_numpy() == expected["label"].astype(str).to_numpy())
    )
    if not same:
        raise ValueError(f"fold {fold} run {run_id}: predictions do not match folds")
    return predictions.set_index(members)


def _names(paths: pd.Series) -> np.ndarray:
    return paths.map(lambda path: PurePath(str(path)).name).to_numpy()


def summarise_folds(
    folds: pd.DataFrame,
    class_names: list[str],
    fold_runs: dict[int, str],
    monitor: str = "val_f1_macro",
    mode: str = "max",
    keep: str = "best",
) -> FoldSummary:
    """`folds` has path, label, group, fold in dataset order; each fold run logged its
    validation predictions in the same order (the order of its validation indices) and its
    per-epoch history (evaluation/history.csv), from which the honest estimate is read."""
    rows, class_rows, parts, histories = [], [], [], {}
    prob_columns = [f"prob_{name}" for name in class_names]
    index_of = {name: i for i, name in enumerate(class_names)}
    for fold in sorted(fold_runs):
        run = get_run(fold_runs[fold])
        metrics = run.data.metrics
        rows.append(
            {"fold": fold, "run_id": run.info.run_id}
            | {m: metrics.get(f"best_{m}", np.nan) for m in FOLD_METRICS}
        )
        histories[fold] = load_artifact_csv(run.info.run_id, "evaluation/history.csv")
        predictions = _fold_predictions(folds, fold, run.info.run_id)
        part = folds.loc[predictions.index].copy()
        part["predicted"] = predictions["predicted"].to_numpy()
        part[prob_columns] = predictions[prob_columns].to_numpy()
        parts.append(part)
        targets = part["label"].map(index_of).to_numpy()
        scores = per_class_metrics(targets, part[prob_columns].to_numpy(), class_names)
        class_rows += [
            {"fold": fold, "class": name, **{kind: scores[kind][name] for kind in scores}}
            for name in class_names
        ]
    oof = pd.concat(parts).sort_index()
    targets = oof["label"].map(index_of).to_numpy()
    probs = oof[prob_columns].to_numpy()
    honest = honest_fold_scores(histories, monitor, mode, keep)
    per_fold = pd.DataFrame(rows).merge(honest, on="fold")
    per_class = pd.DataFrame(class_rows)
    return FoldSummary(
        per_fold=per_fold,
        per_class=per_class,
        oof=oof.reset_index(drop=True),
        metrics=summary_metrics(per_fold, per_class, targets, probs, class_names),
        confusion=confusion(targets, probs.argmax(axis=1), class_names),
        reliability=reliability_bins(targets, probs),
        misclassified=misclassified(list(oof["path"]), targets, probs, class_names),
    )


def summary_metrics(
    per_fold: pd.DataFrame,
    per_class: pd.DataFrame,
    targets: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
) -> dict[str, float]:
    """The honest estimate (honest_*: each fold read at the step chosen on the other folds,
    training.honest_estimate), out-of-fold figures of the kept weights (oof_*), fold mean and
    std of each fold's best-epoch metric (mean_*, std_*: chosen on the fold itself, so
    optimistic), and per class the fold mean and std (f1_mean/<class>, ...)."""
    metrics = honest_summary(per_fold)
    metrics.update({f"oof_{k}": v for k, v in classification_metrics(targets, probs).items()})
    metrics["oof_ece"] = expected_calibration_error(targets, probs)
    for name in FOLD_METRICS:
        metrics[f"mean_{name}"] = float(per_fold[name].mean())
        metrics[f"std_{name}"] = float(per_fold[name].std(ddof=0))
    grouped = per_class.groupby("class")
    for kind in ("f1", "precision", "recall"):
        for name in class_names:
            values = grouped.get_group(name)[kind]
            metrics[f"{kind}_mean/{safe_name(name)}"] = float(values.mean())
            metrics[f"{kind}_std/{safe_name(name)}"] = float(values.std(ddof=0))
    return metrics
