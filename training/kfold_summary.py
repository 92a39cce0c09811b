"""Out-of-fold predictions and per-fold statistics of a k-fold job, from its fold runs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from training import plots
from training.metrics import classification_metrics, confusion
from training.tracking import get_run, load_artifact_csv

FOLD_METRICS = (
    "val_f1_macro",
    "val_accuracy",
    "val_loss",
    "val_precision_macro",
    "val_recall_macro",
)


@dataclass
class FoldSummary:
    per_fold: pd.DataFrame
    oof: pd.DataFrame
    metrics: dict[str, float]
    confusion: dict
    confusion_figure: Figure
    fold_figure: Figure


def summarise_folds(
    folds: pd.DataFrame, class_names: list[str], fold_runs: dict[int, str]
) -> FoldSummary:
    """`folds` has path, label, group, fold in dataset order; each fold run logged its
    validation predictions in the same order (the order of its validation indices)."""
    rows, parts = [], []
    prob_columns = [f"prob_{name}" for name in class_names]
    for fold in sorted(fold_runs):
        run = get_run(fold_runs[fold])
        rows.append(
            {
                "fold": fold,
                "run_id": run.info.run_id,
                **{m: run.data.metrics.get(f"best_{m}", np.nan) for m in FOLD_METRICS},
            }
        )
        predictions = load_artifact_csv(run.info.run_id, "evaluation/val_predictions.csv")
        members = folds.index[folds["fold"] == fold]
        if (
            len(predictions) != len(members)
            or not (predictions["path"].to_numpy() == folds.loc[members, "path"].to_numpy()).all()
        ):
            raise ValueError(f"fold {fold} run {run.info.run_id}: predictions do not match folds")
        part = folds.loc[members].copy()
        part["predicted"] = predictions["predicted"].to_numpy()
        part[prob_columns] = predictions[prob_columns].to_numpy()
        parts.append(part)
    per_fold = pd.DataFrame(rows)
    oof = pd.concat(parts).sort_index()
    targets = oof["label"].map({name: i for i, name in enumerate(class_names)}).to_numpy()
    probs = oof[prob_columns].to_numpy()
    oof_metrics = classification_metrics(targets, probs)
    metrics = {f"oof_{k}": v for k, v in oof_metrics.items()}
    for name in FOLD_METRICS:
        metrics[f"mean_{name}"] = float(per_fold[name].mean())
        metrics[f"std_{name}"] = float(per_fold[name].std(ddof=0))
    matrix = confusion(targets, probs.argmax(axis=1), class_names)
    return FoldSummary(
        per_fold=per_fold,
        oof=oof.reset_index(drop=True),
        metrics=metrics,
        confusion=matrix,
        confusion_figure=plots.confusion_matrix_figure(
            matrix["counts"], class_names, "out-of-fold confusion matrix"
        ),
        fold_figure=plots.fold_bars(
            per_fold["val_f1_macro"].tolist(), "val macro F1", metrics["oof_f1_macro"]
        ),
    )
