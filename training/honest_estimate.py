"""Cross-validation's honest estimate: each fold scored at the epoch the other folds chose.

A fold's best-epoch validation score is chosen on that same fold: on 30-40 validation images
macro F1 moves in steps of ~0.03, so its maximum over 20-35 epochs is optimistic, and more so
for recipes whose curves wobble. The honest score of fold k is its validation score at the
step where the mean curve of the *other* folds peaks (the steps are aligned: stage-2 epoch e
is step stage1_epochs + e in every fold), so nothing of fold k's own validation metrics
decides where it is read. With `keep=last` the run keeps its last epoch, which no validation
score chose: the honest score is the last step's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

SCORED = ("val_f1_macro", "val_accuracy", "val_loss")  # read at the chosen step


def fold_curves(histories: Mapping[int, pd.DataFrame], field: str) -> pd.DataFrame:
    """steps x folds table of one per-epoch field. A fold that stopped a stage early (early
    stopping) carries its last value of that stage forward to the stage's last step: the
    weights it stopped with are the ones it had from then on."""
    columns = {}
    stage_of_step: dict[int, int] = {}
    for fold, history in histories.items():
        fold_steps = history["step"].astype(int)
        stage_of_step.update(zip(fold_steps, history["stage"].astype(int), strict=True))
        columns[fold] = history.set_index(fold_steps)[field]
    steps = sorted(stage_of_step)
    table = pd.DataFrame(columns, index=steps).sort_index(axis=1)
    stages = pd.Series(stage_of_step).reindex(steps)
    return table.groupby(stages.to_numpy()).ffill()


def steps_chosen_elsewhere(curves: pd.DataFrame, mode: str) -> dict[int, int]:
    """Per fold, the step where the mean of the other folds' curves is best (`mode` max or
    min); the earliest such step on ties. Needs at least two folds."""
    if curves.shape[1] < 2:
        raise ValueError("the honest estimate needs at least two folds")
    chosen = {}
    for fold in curves.columns:
        others = curves.drop(columns=fold).mean(axis=1, skipna=True).dropna()
        values = others.to_numpy()
        best = np.nanargmax(values) if mode == "max" else np.nanargmin(values)
        chosen[int(fold)] = int(others.index[best])
    return chosen


def honest_fold_scores(
    histories: Mapping[int, pd.DataFrame], monitor: str, mode: str, keep: str = "best"
) -> pd.DataFrame:
    """One row per fold: the step it is read at (`honest_step`) and its validation scores
    there (`honest_val_f1_macro`, ...). `keep=best` reads each fold at the step chosen on the
    other folds; `keep=last` at its own last step (chosen by no validation score). With one
    fold there are no other folds to choose with: its honest scores are NaN (not estimated)."""
    if keep == "last":
        chosen = {fold: int(h["step"].max()) for fold, h in histories.items()}
    elif len(histories) < 2:  # a partly finished job (promotion reads its out-of-fold rows)
        unread = {"honest_step": np.nan, **{f"honest_{field}": np.nan for field in SCORED}}
        return pd.DataFrame([{"fold": fold, **unread} for fold in sorted(histories)])
    else:
        chosen = steps_chosen_elsewhere(fold_curves(histories, monitor), mode)
    tables = {field: fold_curves(histories, field) for field in SCORED}
    rows = []
    for fold in sorted(chosen):
        step = chosen[fold]
        row = {"fold": fold, "honest_step": step}
        for field, table in tables.items():
            value = table.at[step, fold] if step in table.index else np.nan
            row[f"honest_{field}"] = float(value)
        rows.append(row)
    return pd.DataFrame(rows)


def honest_summary(scores: pd.DataFrame) -> dict[str, float]:
    """Mean and standard deviation over folds of each honest score."""
    metrics = {}
    for field in SCORED:
        values = scores[f"honest_{field}"]
        metrics[f"honest_{field}"] = float(values.mean())
        metrics[f"honest_std_{field}"] = float(values.std(ddof=0))
    return metrics


def running_fold_score(
    histories: list[pd.DataFrame],
    monitor: str,
    mode: str,
    keep: str = "best",
    scored: str | None = None,
) -> float:
    """The honest `scored` value (default: the monitor's) of the newest fold given only the
    folds before it, for pruning a cross-validated trial fold by fold: the first fold
    (nothing to choose on) is read at its last step, later ones at the step where the
    earlier folds' `monitor` is best."""
    scored = scored or monitor
    newest = len(histories) - 1
    if keep == "last" or newest == 0:
        last = histories[-1]
        return float(last.loc[last["step"].idxmax(), scored])
    curves = fold_curves(dict(enumerate(histories)), monitor)
    others = curves.drop(columns=newest).mean(axis=1).dropna()
    best = np.nanargmax(others.to_numpy()) if mode == "max" else np.nanargmin(others.to_numpy())
    step = int(others.index[best])
    return float(fold_curves(dict(enumerate(histories)), scored).at[step, newest])
