"""Temperature scaling of an ensemble, fitted on its k-fold job's out-of-fold predictions."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from registry.errors import PromoteError
from training.calibration import fit_temperature, scaled_log_probs
from training.fold_runs import latest_finished_fold_runs
from training.kfold_summary import summarise_folds
from training.metrics import (
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from training.tracking import load_artifact_csv

log = logging.getLogger(__name__)

# The smallest probability a float32 softmax can write (its smallest subnormal): an exact 0
# in the CSV becomes this, so its log is finite and the fit cannot be dominated by -inf.
SMALLEST_PROBABILITY = 1.4e-45


@dataclass(frozen=True)
class OofCalibration:
    """The temperature and the out-of-fold figures before and after it (plain data)."""

    temperature: float
    folds: list[int]  # folds whose held-out predictions were used
    run_ids: list[str]  # their fold runs (the runs that count), in fold order
    images: int
    figures: dict[str, float]  # oof_f1_macro, ..., oof_ece_(un)calibrated, oof_nll_...
    bins_uncalibrated: dict  # training.metrics.reliability_bins
    bins_calibrated: dict

    @property
    def metrics(self) -> dict[str, float]:
        """What the promote run and the ensemble's LoggedModel carry."""
        return {"temperature": self.temperature, **self.figures}


def oof_predictions(parent: Run, class_names: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Out-of-fold predictions of the job: each finished fold run's validation predictions
    (the run that counts per fold, training.fold_runs, as promotion picks members), put
    together with the job's folds.csv as the k-fold summary does. The same rows as the
    parent's evaluation/oof_predictions.csv once every fold finished; unlike that file,
    also for a partly finished job and after a fold was re-run. Returns the predictions
    and the fold runs they come from."""
    parent_id = parent.info.run_id
    folds_tag = parent.data.tags.get("folds", "")
    runs = latest_finished_fold_runs(parent_id, int(folds_tag) if folds_tag.isdigit() else None)
    try:
        folds = load_artifact_csv(parent_id, "folds.csv", dtype={"path": str, "label": str})
        run_ids = {fold: run.info.run_id for fold, run in runs.items()}
        return summarise_folds(folds, class_names, run_ids).oof, list(run_ids.values())
    except (MlflowException, OSError, KeyError, ValueError) as err:
        raise PromoteError(
            f"k-fold run {parent_id}: cannot read its out-of-fold predictions to calibrate "
            f"the ensemble ({type(err).__name__}: {err})"
        ) from None


def calibrate(oof: pd.DataFrame, class_names: list[str], run_ids: list[str]) -> OofCalibration:
    """Fit T on the out-of-fold probabilities (their logs as logits) and measure the
    out-of-fold figures, ECE and NLL before (T = 1) and after."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(oof["label"]) - set(index))
    if unknown:
        raise PromoteError(f"out-of-fold labels {unknown} are not ensemble classes {class_names}")
    targets = oof["label"].map(index).to_numpy()
    probs = oof[[f"prob_{name}" for name in class_names]].to_numpy(dtype=np.float64)
    log_probs = np.log(np.clip(probs, SMALLEST_PROBABILITY, None))
    temperature = fit_temperature(log_probs, targets)
    before = np.exp(scaled_log_probs(log_probs, 1.0))  # renormalised as written
    after = np.exp(scaled_log_probs(log_probs, temperature))
    figures = {f"oof_{k}": v for k, v in classification_metrics(targets, before).items()}
    for name, scored in (("uncalibrated", before), ("calibrated", after)):
        figures[f"oof_ece_{name}"] = expected_calibration_error(targets, scored)
        figures[f"oof_nll_{name}"] = negative_log_likelihood(targets, scored)
    folds = sorted(int(fold) for fold in oof["fold"].unique())
    log.info(
        "temperature %.3f on %d out-of-fold predictions (folds %s): ECE %.4f -> %.4f",
        temperature,
        len(oof),
        folds,
        figures["oof_ece_uncalibrated"],
        figures["oof_ece_calibrated"],
    )
    return OofCalibration(
        temperature,
        folds,
        list(run_ids),
        len(oof),
        figures,
        reliability_bins(targets, before),
        reliability_bins(targets, after),
    )
